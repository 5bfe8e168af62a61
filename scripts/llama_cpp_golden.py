"""Write tests/golden/smollm2_llama_cpp.json: llama.cpp's tokenization and greedy tokens for SmolLM2.

llama.cpp (PyPI llama-cpp-python) takes about 20 minutes to build from source here, so tests do not need it:
they compare against this file. Regenerate with:

    pip install llama-cpp-python==0.3.36   # CMAKE_ARGS="-DGGML_NATIVE=OFF ..." for a portable build
    python scripts/llama_cpp_golden.py

Each prompt is tokenized (no BOS: the GGUF says add_bos_token=false) and decoded greedily for 32 tokens,
with the first step's top-10 logits for a numeric comparison.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

PROMPTS = [
    "The capital of France is",
    "In 2024, 12345 apples cost $3.50!\n  Hello   world",
    "<|im_start|>user\nWhat is the boiling point of water in Celsius?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nList three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n",
]
NEW_TOKENS = 32


def main(out: Path) -> None:
    import llama_cpp

    from edgecc.models.llama import smollm2_gguf_path

    llm = llama_cpp.Llama(str(smollm2_gguf_path()), n_ctx=512, n_threads=2, verbose=False, logits_all=True)
    cases = []
    for prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        first = np.array(llm.scores[len(ids) - 1], dtype=np.float32)
        top = np.argsort(-first)[:10]
        tokens = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(int(tok))
            if len(tokens) >= NEW_TOKENS:
                break
        cases.append({"prompt": prompt, "ids": [int(i) for i in ids], "greedy": tokens,
                      "first_top10_ids": [int(i) for i in top], "first_top10_logits": [float(first[i]) for i in top]})
        print(repr(prompt[:40]), tokens[:16], file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
                               "cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "tests" / "golden"
         / "smollm2_llama_cpp.json")
