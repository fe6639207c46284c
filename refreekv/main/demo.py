"""`refreekv demo`: a handful of prompts, full cache vs ReFreeKV, on the packaged SmolLM2-135M."""

from __future__ import annotations

from refreekv import ReFreeKVConfig

from .models import load_torch
from .output import markdown_table, rich_table, write
from .prompts import chat, essays, multikey_prompt, needle_prompt
from .runner import answer


def demo_prompts(tok, quick: bool = False) -> list[tuple[str, str, str]]:
    """(name, chat prompt, what a right answer contains). ``quick``: two short prompts."""
    if quick:
        return [("needle ~200 tokens, depth 50%", chat(tok, needle_prompt(150, 0.5, number=7417)), "7417"),
                ("short question", chat(tok, "What is the capital of France?"), "Paris")]
    mk, _, code = multikey_prompt(900, keys=4, seed=3)
    summary = " ".join(essays()[5].split()[:900]) + "\n\nSummarize the text above in two sentences."
    return [
        ("needle ~1k tokens, depth 30%", chat(tok, needle_prompt(700, 0.3, number=7417)), "7417"),
        ("needle ~3k tokens, depth 70%", chat(tok, needle_prompt(2200, 0.7, number=5280, offset=7)), "5280"),
        ("multi-key retrieval ~1.3k tokens", chat(tok, mk), code),
        ("summary of an essay ~1.2k tokens", chat(tok, summary), ""),
        ("short question", chat(tok, "What is the capital of France?"), "Paris"),
    ]


def run_demo(config: ReFreeKVConfig, out_dir: str, max_new_tokens: int = 24, as_json: bool = False,
             quick: bool = False) -> dict:
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=as_json)
    model, tok = load_torch()
    rows, records = [], []
    for name, prompt, expect in track(demo_prompts(tok, quick), description="demo prompts", console=console):
        full = answer(model, tok, prompt, None, max_new_tokens)
        ours = answer(model, tok, prompt, config, max_new_tokens)
        n = len(tok(prompt)["input_ids"])
        rec = {"prompt": name, "tokens": n, "budget": ours.budget, "kv_bytes_full": full.kv_bytes,
               "kv_bytes_refreekv": ours.kv_bytes, "memory_saved": 1 - ours.kv_bytes / full.kv_bytes,
               "seconds_full": full.prefill_s + full.decode_s, "seconds_refreekv": ours.prefill_s + ours.decode_s,
               "compress_seconds": ours.compress_s, "answer_full": full.text, "answer_refreekv": ours.text,
               "expected": expect, "full_correct": expect in full.text if expect else None,
               "refreekv_correct": expect in ours.text if expect else None}
        records.append(rec)
        rows.append([name, n, f"{ours.budget:.1%}", f"{rec['memory_saved']:.1%}",
                     f"{rec['seconds_full']:.1f} / {rec['seconds_refreekv']:.1f}", full.text.strip(), ours.text.strip()])
    headers = ["prompt", "tokens", "budget", "KV memory saved", "time s (full / refreekv)", "full cache", "ReFreeKV"]
    md = (f"# refreekv demo (SmolLM2-135M-Instruct, {config})\n\n" + markdown_table(headers, rows))
    write(out_dir, "demo", {"config": repr(config), "prompts": records}, md)
    if not as_json:
        console.print(rich_table("ReFreeKV vs full cache", headers, rows))
        console.print(f"results written to {out_dir}/demo.json and demo.md")
    return {"config": repr(config), "prompts": records}
