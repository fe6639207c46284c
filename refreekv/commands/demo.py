"""`refreekv demo`: a handful of prompts, full cache vs ReFreeKV, on the packaged SmolLM2-135M.

Each prompt is prefilled once; the full cache and ReFreeKV answer from that prefill. The table
says, per prompt, whether ReFreeKV's answer is right (when a right answer is known) and whether it
is the full cache's answer, and a summary line counts both. An answer that differs says how close it
is: the token where it leaves the full cache's, and ReFreeKV teacher-forced on the full cache's answer
(top-1 agreement and KL per token against the full cache's own distribution there).
"""

from __future__ import annotations

import numpy as np
import torch

from refreekv import ReFreeKVConfig

from .models import load_torch
from .output import markdown_table, write
from .prompts import chat, essays, multikey_prompt, needle_prompt
from .runner import _fork, diverges_at, forced, greedy, kl_top1


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


@torch.no_grad()
def run_demo(config: ReFreeKVConfig, out_dir: str, max_new_tokens: int = 24, as_json: bool = False,
             quick: bool = False, prompts: list[str] | None = None) -> dict:
    """Full cache vs ReFreeKV from one prefill per prompt: the demo's prompts, or ``prompts`` (your own
    texts, each put in the chat template; no expected answer, the full cache's is the reference)."""
    from rich.console import Console
    from rich.progress import track

    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill

    console = Console(stderr=as_json)
    model, tok = load_torch()
    rows, records = [], []
    todo = demo_prompts(tok, quick) if not prompts else \
        [(f"your prompt {i + 1}: {' '.join(t.split())[:40]!r}", chat(tok, t), "") for i, t in enumerate(prompts)]
    for name, prompt, expect in track(todo, description="demo prompts", console=console):
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        pre = capture_prefill(model, ids, configs=config)
        full = greedy(model, tok, _fork(pre.cache), pre.logits, n, max_new_tokens)
        cache = ReFreeKVCache.from_prefill(pre, config)
        ours = greedy(model, tok, cache, pre.logits, n, max_new_tokens)
        rep = cache.report
        same = ours.tokens == full.tokens
        right = (expect in ours.text) if expect else None
        # closeness on the full cache's answer, teacher-forced (a fresh compressed cache: ``ours`` appended to its own)
        kl, agree = kl_top1(forced(model, _fork(pre.cache), pre.logits, n, full.tokens),
                            forced(model, ReFreeKVCache.from_prefill(pre, config), pre.logits, n, full.tokens))
        top1 = round(agree * len(full.tokens))
        leaves = diverges_at(ours.tokens, full.tokens)
        rec = {"prompt": name, "tokens": n, "budget": rep.budget[0], "kv_bytes_full": rep.bytes_before,
               "kv_bytes_refreekv": rep.bytes_after, "memory_saved": 1 - rep.bytes_after / rep.bytes_before,
               "compress_seconds": rep.seconds, "answer_full": full.text, "answer_refreekv": ours.text,
               "expected": expect, "full_correct": (expect in full.text) if expect else None,
               "refreekv_correct": right, "same_as_full": same, "differs_at_token": leaves,
               "forced_top1_agreement": agree, "forced_kl": kl}
        records.append(rec)
        verdict = ("same as full" if same else
                   f"differs from token {leaves + 1} of {len(full.tokens)} (on the full cache's answer: "
                   f"top-1 {top1}/{len(full.tokens)}, KL {kl:.3f})") + ("" if right is None else ("; right" if right else "; WRONG"))
        rows.append([name, n, f"{rep.budget[0]:.0%}", f"{rec['memory_saved']:.0%}", full.text.strip(),
                     ours.text.strip(), verdict])
    saved = 1 - sum(r["kv_bytes_refreekv"] for r in records) / sum(r["kv_bytes_full"] for r in records)
    known = [r for r in records if r["expected"]]
    right = (f"{sum(bool(r['refreekv_correct']) for r in known)}/{len(known)} right where the answer is known "
             f"(full cache: {sum(bool(r['full_correct']) for r in known)}/{len(known)}); ") if known else ""
    summary = (f"{sum(r['same_as_full'] for r in records)}/{len(records)} answers as the full cache; "
               f"{right}KV memory saved {saved:.0%}; "
               f"teacher-forced on the full cache's answers: top-1 agreement "
               f"{np.mean([r['forced_top1_agreement'] for r in records]):.0%}, "
               f"KL {np.mean([r['forced_kl'] for r in records]):.3f} per token")
    headers = ["prompt", "tokens", "budget", "KV saved", "full cache", "ReFreeKV", "verdict"]
    md = f"# refreekv demo (SmolLM2-135M-Instruct, {config})\n\n{markdown_table(headers, rows)}\n\n{summary}\n"
    result = {"config": config.to_dict(), "prompts": records, "summary": summary}
    write(out_dir, "demo", result, md)
    if not as_json:  # stacked, so that it reads in an 80-column terminal; the table is in demo.md
        for r, row in zip(records, rows):
            console.print(f"[bold]{r['prompt']}[/] ({r['tokens']} tokens): budget {row[2]}, KV saved {row[3]}: {row[6]}")
            console.print(f"  full cache: {r['answer_full'].strip()!r}", markup=False)
            console.print(f"  ReFreeKV:   {r['answer_refreekv'].strip()!r}", markup=False)
        console.print(f"[bold]{summary}[/]")
        console.print(f"results written to {out_dir}/demo.json and demo.md")
    return result
