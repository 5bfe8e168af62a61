"""Measure a decoder artifact's resident memory during generation, to check the manifest's memory plan.

    python -m edgecc.runtime_bridge.llm_memory ARTIFACT --prompt-ids 1,2,3 -n 64   # prints JSON

Run in a fresh process so the baseline is the interpreter with TVM loaded and nothing else. Reports the
resident set (RSS) before loading, after loading (weights + caches allocated), after the first token and
after every token, and the plan from the manifest (weights + KV cache at max context + largest arena).
"""

from __future__ import annotations

import argparse
import json
import os


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(artifact: str, prompt_ids: list[int], new_tokens: int, threads: int | None = None) -> dict:
    import tvm  # noqa: F401 - load TVM's libraries before the baseline

    from edgecc.runtime_bridge.llm_session import LLMSession

    baseline = rss_bytes()
    session = LLMSession(artifact, num_threads=threads)
    loaded = rss_bytes()
    per_token: list[int] = []
    session.generate(prompt_ids, new_tokens, on_token=lambda _t: per_token.append(rss_bytes()))
    mem = session.manifest["memory"]
    plan = mem["weights_bytes"] + mem["kv_cache_bytes"] + max(mem["arena_bytes"].values(), default=0)
    return {"baseline_rss": baseline, "loaded_rss": loaded, "per_token_rss": per_token,
            "growth_bytes": per_token[-1] - baseline, "plan_bytes": plan,
            "plan": {k: mem[k] for k in ("weights_bytes", "kv_cache_bytes", "arena_bytes")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    ids = [int(t) for t in args.prompt_ids.split(",")]
    print(json.dumps(measure(args.artifact, ids, args.n, args.threads)))


if __name__ == "__main__":
    main()
