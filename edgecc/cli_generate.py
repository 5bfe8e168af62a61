"""`edgecc generate`: stream text from a decoder artifact and report TTFT, tokens/s and peak memory."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgecc.cli import _fmt_bytes, err, out, user_errors
from edgecc.errors import EdgeccError


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text (or use --prompt-ids).")
@click.option("--prompt-ids", default=None, metavar="ID,ID,...", help="Prompt as token ids (no tokenizer needed).")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (one user turn).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling (with --temperature).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--threads", type=int, default=None, help="Runtime threads (default: all cores).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print tokens and stats as JSON at the end.")
@user_errors
def generate(artifact: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int, chat: bool,
             temperature: float, top_p: float, seed: int, threads: int | None, ignore_eos: bool, as_json: bool):
    """Generate text with a decoder ARTIFACT (built with --max-context), streaming tokens as they come.

    Greedy by default. Prints time to first token (prompt processing + first token), decode tokens/s
    (the tokens after the first) and the process's peak resident memory. A prompt longer than the
    artifact's --max-context is an error; generation stops when the KV cache is full.
    """
    import json

    from edgecc.models.gguf_tokenizer import TextTokenizer
    from edgecc.runtime_bridge.llm_session import LLMSession, Sampler

    if (prompt is None) == (prompt_ids is None):
        raise EdgeccError("give exactly one of --prompt and --prompt-ids", "e.g. --prompt 'Once upon a time'")
    if max_new_tokens < 1:
        raise EdgeccError(f"--max-new-tokens must be >= 1, got {max_new_tokens}", "e.g. -n 64")
    sampler = Sampler(temperature, top_p, seed)
    with err.status("loading the artifact..."):
        session = LLMSession(artifact, num_threads=threads)
    tokenizer = TextTokenizer.from_dir(artifact) if session.llm.get("tokenizer") else None
    if prompt is not None:
        if tokenizer is None:
            raise EdgeccError(f"'{artifact}' has no tokenizer", "give --prompt-ids, or rebuild with --tokenizer DIR")
        text = tokenizer.apply_chat_template(prompt) if chat else prompt
        ids = tokenizer.encode(text)
    else:
        if chat:
            raise EdgeccError("--chat needs --prompt (text)", "drop --chat or give --prompt")
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError as exc:
            raise EdgeccError(f"--prompt-ids must be comma-separated integers ({exc})", "e.g. --prompt-ids 1,2,3") \
                from exc
    eos = None if ignore_eos or tokenizer is None else tokenizer.eos_token_id
    decoded: list[int] = []
    printed = [""]

    def stream(token: int) -> None:
        if as_json:
            return
        decoded.append(token)
        if tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = tokenizer.decode(decoded)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(printed[0]):])
                printed[0] = text
        sys.stdout.flush()

    tokens, stats = session.generate(ids, max_new_tokens, sampler, eos, stream)
    if as_json:
        out.print_json(json.dumps({"prompt_ids": ids, "tokens": tokens,
                                   "text": tokenizer.decode(tokens) if tokenizer else None,
                                   "ttft_s": stats.ttft_s, "decode_tokens_per_s": stats.decode_tokens_per_s,
                                   "peak_rss_bytes": stats.peak_rss_bytes, "stopped": stats.stopped}))
        return
    sys.stdout.write("\n")
    note = {"max_context": f" (the KV cache is full: {session.max_context} positions)",
            "eos": " (end of sequence)"}.get(stats.stopped, "")
    err.print(f"prompt {stats.prompt_tokens} tokens, generated {stats.new_tokens}{note}; "
              f"TTFT {stats.ttft_s * 1000:.1f} ms, decode {stats.decode_tokens_per_s:.1f} tokens/s, "
              f"peak RSS {_fmt_bytes(stats.peak_rss_bytes)}")
