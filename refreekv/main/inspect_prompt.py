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
    """Prefill once with a plain cache, then run the ReFreeKV plan on every layer's captured
    queries and keys (the same computation the cache does), keeping the curves."""
    from transformers import DynamicCache

    from refreekv.adapters.transformers import _queries, attention_modules, cache_kwarg

    model, tok = load_torch()
    prompt = text if raw else chat(tok, text)
    ids = tok([prompt], return_tensors="pt")
    n = ids["input_ids"].shape[1]
    config.check_layers(model.config.num_hidden_layers)
    captured = {}

    def grab(module, args, kwargs, output):
        rows = config.rows_needed(n)
        cos, sin = kwargs["position_embeddings"]
        captured[module.layer_idx] = _queries(module, kwargs["hidden_states"][:, -rows:], cos[:, -rows:], sin[:, -rows:])

    mods = attention_modules(model)
    hooks = [m.register_forward_hook(grab, with_kwargs=True) for m in mods]
    cache = DynamicCache(config=model.config)
    try:
        model(**ids, **{cache_kwarg(model): cache})
    finally:
        for h in hooks:
            h.remove()
    layers, curves, rows = [], {}, []
    for m in mods:
        i = m.layer_idx
        keys = cache.layers[i].keys
        plan = refreekv.plan_layer(captured[i], keys, config, scale=m.scaling)
        kept = n if config.is_retained(i) else int(plan.cut[0])
        curves[i] = plan.ratio[0].numpy().tolist()
        layers.append({"layer": i, "kept": kept, "budget": kept / n, "retained": config.is_retained(i),
                       "cut_if_compressed": int(plan.cut[0])})
        rows.append([i, kept, f"{kept / n:.1%}", "retained" if config.is_retained(i) else ""])
    budget = float(np.mean([x["budget"] for x in layers]))
    result = {"tokens": n, "config": repr(config), "budget": budget, "layers": layers}
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
