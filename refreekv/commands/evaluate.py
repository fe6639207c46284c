"""`refreekv eval`: quality on the real model, full cache vs ReFreeKV vs the fixed-budget front.

Three fixed splits (``refreekv.commands.tasks``): choose on ``dev`` (and, since round three of issue
10, ``test``), report on ``holdout`` (other texts). Each prompt
is prefilled once; every method is evaluated from that prefill (``runner.run_prompt``); results
are cached in ``<out>/eval_cache.jsonl`` so a re-run computes only new (prompt, method) pairs.

Per method: needle accuracy (overall and per length), multi-key accuracy, continuation KL /
top-1 agreement / perplexity, open-question similarity and KL against the full cache's answer,
the budget (mean, min, max over prompts, and per length), KV memory saved and compression time.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from refreekv import ReFreeKVConfig
from refreekv.errors import bad_input

from .models import load_torch
from .output import markdown_table, rich_table, write
from .runner import ResultsCache, code_fingerprint, methods, run_prompt
from .tasks import build


def aggregate(records: list[dict]) -> dict:
    """Per-method summary of the records of one method."""
    by = defaultdict(list)
    for r in records:
        by[r["kind"]].append(r)
    budgets = [r["budget"] for r in records]
    out = {"prompts": len(records), "budget": float(np.mean(budgets)), "budget_min": float(np.min(budgets)),
           "budget_max": float(np.max(budgets)),
           "kv_memory_saved": 1 - sum(r["kv_bytes"] for r in records) / sum(r["kv_bytes_full"] for r in records),
           "compress_ms": float(np.mean([r["compress_s"] for r in records]) * 1e3)}
    for kind in ("needle", "multikey"):
        rs = by.get(kind, [])
        if rs:
            out[kind] = float(np.mean([r["ok"] for r in rs]))
            out[f"{kind}_full"] = float(np.mean([r["full_ok"] for r in rs]))
            out[f"{kind}_right"] = int(sum(r["ok"] for r in rs))
            out[f"{kind}_n"] = len(rs)
    lengths = sorted({r["length"] for r in by.get("needle", [])})
    out["needle_by_length"] = {str(n): float(np.mean([r["ok"] for r in by["needle"] if r["length"] == n]))
                               for n in lengths}
    out["budget_by_length"] = {str(n): float(np.mean([r["budget"] for r in by["needle"] if r["length"] == n]))
                               for n in lengths}
    if by.get("continuation"):
        for k in ("kl", "top1", "ppl"):
            out[f"cont_{k}"] = float(np.mean([r[k] for r in by["continuation"]]))
    if by.get("open"):
        out["open_kl"] = float(np.mean([r["kl"] for r in by["open"]]))
        out["open_similarity"] = float(np.mean([r["similarity"] for r in by["open"]]))
        out["open_same"] = float(np.mean([r["same"] for r in by["open"]]))
    return out


def evaluate(group: str, split: str, size: str, out_dir: str, *, default: ReFreeKVConfig | None = None,
             plot: bool = True, as_json: bool = False, use_cache: bool = True, limit: int | None = None,
             max_length: int | None = None, min_length: int | None = None, kinds: list[str] | None = None) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=as_json)
    model, tok = load_torch()
    prompts = build(tok, split, size)
    lengths = sorted({p.length for p in prompts})
    filters = (("--max-length", max_length, lambda p: p.length <= max_length),
               ("--min-length", min_length, lambda p: p.length >= min_length),
               ("--kinds", ",".join(kinds or ()), lambda p: p.kind in kinds))
    for option, value, keep in filters:
        if not value:
            continue
        kept = [p for p in prompts if keep(p)]
        if not kept:  # the filter that left nothing is the one to name
            left = f"kinds {sorted({p.kind for p in prompts})}, lengths {sorted({p.length for p in prompts})}"
            raise bad_input(option, value, f"a filter that keeps some of the {split} split's prompts (left by the "
                            f"filters before it: {left}; the split's lengths {lengths})")
        prompts = kept
    prompts = prompts[:limit]
    table = methods(group, default)
    fp = code_fingerprint()
    store = ResultsCache(Path(out_dir) / "eval_cache.jsonl" if use_cache else None)
    records: dict[str, list[dict]] = {name: [] for name in table}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        bar = progress.add_task(f"eval {group} on {split} ({size})", total=len(prompts))
        for prompt in prompts:
            keys = {name: store.key(prompt, cfg, fp) for name, cfg in table.items()}
            todo = {name: cfg for name, cfg in table.items() if store.get(keys[name]) is None}
            if todo:
                progress.update(bar, description=f"{prompt.id} ({len(todo)} methods)")
                for name, rec in run_prompt(model, tok, prompt, todo).items():
                    store.put(keys[name], rec)
            for name in table:
                records[name].append(store.get(keys[name]))
            progress.advance(bar)
    results = {name: aggregate(recs) for name, recs in records.items()}
    configs = {name: None if cfg is None else cfg.to_dict() for name, cfg in table.items()}
    out = {"group": group, "split": split, "size": size, "max_length": max_length, "min_length": min_length,
           "kinds": kinds, "prompts": len(prompts), "code": fp, "results": results, "configs": configs}
    stem = (f"eval_{group}_{split}_{size}" + ("" if min_length is None else f"_from{min_length}")
            + ("" if max_length is None else f"_upto{max_length}") + ("_" + "_".join(kinds) if kinds else ""))
    md = report_markdown(out)
    write(out_dir, stem, out, md)
    (Path(out_dir) / f"{stem}_records.json").write_text(__import__("json").dumps(records, indent=1))
    if plot:
        plot_front(results, f"{out_dir}/{stem}.png", f"{group}, {split} split")
    if not as_json:
        console.print(rich_table(f"quality ({group}, {split}, {size})", *compact_rows(results)))
        console.print(f"full tables: {out_dir}/{stem}.md and .json")
    return out


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def compact_rows(results: dict) -> tuple[list[str], list[list]]:
    """An 80-column table: method, budget, needle, multi-key, KL, open similarity."""
    headers = ["method", "budget", "needle", "mkey", "KL", "open sim"]
    rows = [[name, f"{r['budget']:.0%}", _f(r.get("needle"), ".2f"), _f(r.get("multikey"), ".2f"),
             _f(r.get("cont_kl"), ".4f"), _f(r.get("open_similarity"), ".2f")] for name, r in results.items()]
    return headers, rows


def report_markdown(out: dict) -> str:
    res = out["results"]
    lengths = sorted({n for r in res.values() for n in r["needle_by_length"]}, key=int)
    headers = ["method", "budget (min-max)", "KV saved", "needle acc", *[f"needle {n}" for n in lengths],
               "multi-key acc", "cont. KL", "top-1", "ppl", "open KL", "open sim", "compress ms"]
    rows = []
    for name, r in res.items():
        rows.append([name, f"{r['budget']:.1%} ({r['budget_min']:.0%}-{r['budget_max']:.0%})",
                     f"{r['kv_memory_saved']:.1%}", _f(r.get("needle"), ".3f"),
                     *[_f(r["needle_by_length"].get(n), ".2f") for n in lengths],
                     _f(r.get("multikey"), ".3f"), _f(r.get("cont_kl"), ".4f"), _f(r.get("cont_top1"), ".3f"),
                     _f(r.get("cont_ppl"), ".2f"), _f(r.get("open_kl"), ".4f"), _f(r.get("open_similarity"), ".2f"),
                     _f(r.get("compress_ms"), ".1f")])
    shown = [0] + [j for j in range(1, len(headers)) if any(row[j] != "-" for row in rows)]  # drop kinds not run
    headers, rows = [headers[j] for j in shown], [[row[j] for j in shown] for row in rows]
    kinds = f" ({', '.join(out['kinds'])} prompts)" if out.get("kinds") else ""
    text = (f"# refreekv eval: {out['group']} methods, {out['split']} split, {out['size']} tasks{kinds}\n\n"
            f"SmolLM2-135M-Instruct, float32, torch CPU; {out['prompts']} prompts; code {out['code']}.\n\n"
            + markdown_table(headers, rows))
    if lengths:
        budgets = [["method", *[f"budget {n}" for n in lengths]]]
        brow = [[name, *[_f(r["budget_by_length"].get(n), ".1%") for n in lengths]] for name, r in res.items()]
        text += "\n\n## Budget per needle length\n\n" + markdown_table(budgets[0], brow)
    return text


def plot_front(results: dict, path: str, title: str) -> None:
    """Needle accuracy and continuation KL against the mean budget: one curve per fixed-budget
    method, one point per threshold-free configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, label) for m, label in (("needle", "needle accuracy"), ("cont_kl", "KL(full || method) per token"))
              if any(m in r for r in results.values())]  # a run of some prompt kinds has only some panels
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    curves = defaultdict(list)
    points = {}
    for name, r in results.items():
        head, _, tail = name.rpartition(" ")
        if tail.endswith("%") and head in ("streamingllm", "h2o", "snapkv"):
            curves[head].append(r)
        else:
            points[name] = r
    for ax, (metric, label) in zip(axes[0], panels):
        for head, rs in curves.items():
            rs = sorted(rs, key=lambda r: r["budget"])
            ax.plot([r["budget"] for r in rs], [r.get(metric, np.nan) for r in rs], marker="o", ms=3, label=head)
        for name, r in points.items():
            ax.scatter(r["budget"], r.get(metric, np.nan), marker="*" if name == "full" else "D", s=50, zorder=3)
            ax.annotate(name, (r["budget"], r.get(metric, np.nan)), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="mean budget (fraction of prompt tokens kept)", ylabel=label, title=f"{label} ({title})")
        if metric == "cont_kl":
            ax.set_yscale("symlog", linthresh=1e-3)
        if curves:  # the fixed-budget curves are the only labelled artists (points are annotated)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
