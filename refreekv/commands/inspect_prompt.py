"""`refreekv inspect`: per-layer kept counts and norm-ratio curves for one prompt."""

from __future__ import annotations

import numpy as np
import torch

import refreekv
from refreekv import ReFreeKVConfig

from .models import load_torch
from .output import markdown_table, rich_table, write
from .prompts import chat


@torch.no_grad()
def inspect_prompt(text: str, config: ReFreeKVConfig, out_dir: str, raw: bool = False, plot: bool = True,
                   as_json: bool = False) -> dict:
    """Prefill once (``capture_prefill``), then plan every layer with ``refreekv.plan_layers`` on the
    captured queries and keys: the same computation the cache does, keeping the curves."""
    from refreekv.adapters.transformers import capture_prefill

    model, tok = load_torch()
    prompt = text if raw else chat(tok, text)
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    pre = capture_prefill(model, ids, configs=config)
    rows_q = config.rows_needed(n)
    mods = [cap.module for cap in pre.captured]
    plans = refreekv.plan_layers([cap.queries(rows_q) for cap in pre.captured],
                                 [pre.cache.layers[m.layer_idx].keys for m in mods], config,
                                 scale=[m.scaling for m in mods])
    layers, curves, rows = [], {}, []
    for m, plan in zip(mods, plans):
        i = m.layer_idx
        kept = n if config.is_retained(i) else int(plan.cut[0])
        curves[i] = plan.ratio[0].numpy().tolist()
        layers.append({"layer": i, "kept": kept, "budget": kept / n, "retained": config.is_retained(i),
                       "cut_if_compressed": int(plan.cut[0])})
        rows.append([i, kept, f"{kept / n:.1%}", "retained" if config.is_retained(i) else ""])
    budget = float(np.mean([x["budget"] for x in layers]))
    result = {"tokens": n, "config": config.to_dict(), "budget": budget, "layers": layers}
    md = f"# refreekv inspect: {n} tokens, budget {budget:.1%}\n\n" + markdown_table(["layer", "kept", "budget", ""], rows)
    write(out_dir, "inspect", dict(result, ratio_curves=curves), md)
    if plot:
        _plot(curves, layers, config, n, out_dir)
    if not as_json:
        from rich.console import Console

        c = Console()
        c.print(rich_table(f"kept tokens per layer ({n}-token prompt, budget {budget:.1%})",
                           ["layer", "kept", "budget", ""], rows))
        c.print(f"results written to {out_dir}/inspect.json, inspect.md" + (", inspect.png" if plot else ""))
    return result


def _plot(curves: dict, layers: list, config: ReFreeKVConfig, n: int, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    for i, curve in curves.items():
        a.plot(np.arange(1, n + 1), curve, color=cmap(i / max(1, len(curves) - 1)), lw=0.8)
    a.axhline(config.threshold, color="red", ls="--", lw=1, label=f"T = {config.threshold}")
    a.set_yscale("symlog", linthresh=1e-3)  # linear near 0 (exact zeros), logarithmic around T
    a.set_ylim(0, 1.05)
    a.set(xscale="log", xlabel="kept prefix length j (sinks, then newest first)",
          ylabel="norm ratio 1 - ||kept|| / ||full||", title="norm-ratio curve per layer (colour = layer)")
    a.legend()
    b.bar([x["layer"] for x in layers], [x["kept"] for x in layers],
          color=["grey" if x["retained"] else "tab:blue" for x in layers])
    b.axhline(n, color="black", lw=0.8)
    b.set(xlabel="layer", ylabel="kept tokens", title=f"kept tokens per layer (n = {n}; grey = retained)")
    fig.tight_layout()
    fig.savefig(f"{out_dir}/inspect.png", dpi=110)
    plt.close(fig)
