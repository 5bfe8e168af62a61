"""onnxruntime running the same prefill/decode ONNX graphs: the reference edgecc's generation is checked against.

It runs the graphs as exported (the cache grows by Concat each step), with the same prompt handling as
`LLMSession`: the prompt padded to the prefill length, later tokens one decode step each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtDecoder:
    def __init__(self, export_dir: str | Path, threads: int = 0, decode_file: str = "decode.onnx",
                 prefill_file: str | None = "prefill.onnx"):
        import onnxruntime as ort

        export_dir = Path(export_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.dec = ort.InferenceSession(str(export_dir / decode_file), opts, providers=["CPUExecutionProvider"])
        self.pre = None
        if prefill_file and (export_dir / prefill_file).exists():
            self.pre = ort.InferenceSession(str(export_dir / prefill_file), opts, providers=["CPUExecutionProvider"])
            self.prefill_len = self.pre.get_inputs()[0].shape[1]
        self.past_names = [i.name for i in self.dec.get_inputs() if i.name.startswith("past")]
        self.kv = None
        self.position = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.position = 0
        if self.pre is not None:
            chunk = ids[: self.prefill_len]
            padded = np.zeros((1, self.prefill_len), np.int64)
            padded[0, : len(chunk)] = chunk
            outs = self.pre.run(None, {"input_ids": padded, "last_index": np.array([len(chunk) - 1], np.int64)})
            logits = outs[0]
            self.kv = [o[:, :, : len(chunk)] for o in outs[1:]]
            self.position = len(chunk)
            rest = ids[self.prefill_len:]
        else:
            shape = self.dec.get_inputs()[2].shape
            self.kv = [np.zeros((1, shape[1], 0, shape[3]), np.float32) for _ in self.past_names]
            rest = ids
        for token in rest:
            logits = self.decode(token)
        return logits

    def decode(self, token: int) -> np.ndarray:
        feeds = {"input_ids": np.array([[token]], np.int64), "position_ids": np.array([[self.position]], np.int64)}
        feeds.update(dict(zip(self.past_names, self.kv)))
        outs = self.dec.run(None, feeds)
        self.kv = outs[1:]
        self.position += 1
        return outs[0]

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        logits = self.prefill(list(prompt_ids))
        out = []
        while True:
            token = int(np.argmax(logits.reshape(-1)))
            out.append(token)
            if len(out) >= max_new_tokens:
                return out
            logits = self.decode(token)
