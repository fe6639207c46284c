"""Where a configuration's continuation KL comes from: which layers, which tokens (docs/results.md).

    python scripts/kl_sources.py --split dev [--threshold 0.001] [--out docs/measured] [--limit N]

For each continuation prompt of the split (2k tokens of essay, 128 teacher-forced tokens after it),
the prompt is prefilled once and compressed with the configuration (the library's default unless
--threshold etc. say otherwise). Then, from copies of that prefill:
- KL(full || method) per continuation token, and how much of the prompt's KL its 5 worst tokens
  carry (the worst one is printed with the text before it);
- for every compressed layer l, the KL when layer l alone is given back whole (the other layers as
  the method kept them): ``1 - KL_l / KL`` is the share of the KL that layer's eviction causes;
- (position ranking) the attention mass that the score rows (the newest ``query_rows`` prompt
  queries, mean over rows and heads) put on the tokens the layer evicted: what the halting norm let go.
Prints two tables and writes kl_sources_<split>.md and .json to --out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch



@torch.no_grad()
def one_prompt(model, tok, prompt, config) -> dict:
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands import runner

    ids = tok([prompt.text], return_tensors="pt", add_special_tokens=False)["input_ids"]
    targets = tok(prompt.target, add_special_tokens=False)["input_ids"]
    if len(targets) < 2:
        raise ValueError(f"prompt {prompt.id!r}: target tokenizes to {len(targets)} tokens; expected a continuation "
                         "of at least 2 tokens")
    n = ids.shape[1]
    pre = capture_prefill(model, ids, configs=[config])
    full = runner._fork(pre.cache)
    cache = ReFreeKVCache.from_prefill(pre, config)
    kept = [r.kept[0] for r in cache.report.layers]
    L = len(kept)
    compressed = [i for i in range(L) if kept[i] < n]
    mixes = [runner.Layers.mixed(full, cache, {i}) for i in compressed]
    logits = runner.forced_many(model, [full, cache, *mixes], pre.logits, n, targets)
    evicted_mass = {}
    if config.ranking == "position":  # kept = the sinks and the newest run: the evicted tokens are one block
        from refreekv import api

        for i in compressed:
            recent = kept[i] - min(config.sinks, kept[i])
            P = api.attention_rows(pre.captured[i].queries(config.rows_for(n)), pre.cache.layers[i].keys)
            evicted_mass[str(i)] = float(P[..., config.sinks:n - recent].sum(-1).mean())
    base = runner.kl_per_token(logits[0], logits[1])
    kl = float(base.mean())
    restored = {i: float(runner.kl_per_token(logits[0], x).mean()) for i, x in zip(compressed, logits[2:])}
    worst = int(base.argmax())
    return {"prompt": prompt.id, "n": n, "budget": cache.report.budget[0], "kl": kl,
            "top5_share": float(base.sort(descending=True).values[:5].sum() / base.sum()) if kl > 0 else 0.0,
            "worst_token": {"index": worst, "kl": float(base[worst]),
                            "before": tok.decode(targets[max(0, worst - 8):worst]),
                            "token": tok.decode(targets[worst:worst + 1])},
            "kept": kept, "kl_with_layer_whole": {str(i): v for i, v in restored.items()},
            "evicted_mass": evicted_mass}


def main(argv=None) -> None:
    from rich.console import Console
    from rich.progress import track

    from refreekv.cli import _config_args, config_from
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write
    from refreekv.commands.tasks import build

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", choices=["dev", "test"], default="dev")
    p.add_argument("--limit", type=int, help="only the first N continuations")
    p.add_argument("--out", default="results", help="folder for kl_sources_<split>.md and .json")
    _config_args(p)
    a = p.parse_args(argv)
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit: received {a.limit}; expected an int >= 1")
    config = config_from(a)
    console = Console()
    t0 = time.perf_counter()
    model, tok = load_torch()
    prompts = [q for q in build(tok, a.split) if q.kind == "continuation"][:a.limit]
    rows = [one_prompt(model, tok, q, config) for q in track(prompts, description=f"{a.split} continuations")]
    L = len(rows[0]["kept"])
    layer_rows = []
    for i in range(L):
        frac = [r["kept"][i] / r["n"] for r in rows]
        share = [1 - r["kl_with_layer_whole"][str(i)] / r["kl"] if str(i) in r["kl_with_layer_whole"] and r["kl"] > 0
                 else 0.0 for r in rows]
        mass = [r["evicted_mass"].get(str(i), 0.0) for r in rows]
        layer_rows.append([i, f"{np.mean(frac):.2f} ({min(frac):.2f}-{max(frac):.2f})", f"{np.mean(mass):.3f}",
                           f"{np.mean(share):+.3f}"])
    total_share = float(np.mean([sum(1 - v / r["kl"] for v in r["kl_with_layer_whole"].values()) for r in rows
                                 if r["kl"] > 0]))
    prompt_rows = [[r["prompt"], f"{r['budget']:.1%}", f"{r['kl']:.4f}", f"{r['top5_share']:.2f}",
                    f"{r['worst_token']['kl']:.3f}", repr(r["worst_token"]["before"] + "⟨" + r["worst_token"]["token"] + "⟩")]
                   for r in rows]
    lh = ["layer", "kept fraction (min-max)", "score rows' attention on evicted tokens",
          "share of the KL removed by keeping the layer whole"]
    ph = ["prompt", "budget", "KL", "share in the 5 worst tokens", "worst token's KL", "text before ⟨the worst token⟩"]
    seconds = time.perf_counter() - t0
    from refreekv import ReFreeKVConfig

    described = "the default configuration" if config == ReFreeKVConfig.evicting() else f"configuration {config}"
    head = (f"# Where the continuation KL comes from ({a.split} split)\n\n`python scripts/kl_sources.py --split "
            f"{a.split}`, {described}; {len(rows)} continuations, {seconds:.0f} s.\n\nMean KL "
            f"{np.mean([r['kl'] for r in rows]):.4f}; the single-layer shares add up to {total_share:.2f} of it "
            "on average (1.00 = the layers' effects add).\n\n")
    md = head + markdown_table(lh, layer_rows) + "\n\n" + markdown_table(ph, prompt_rows)
    write(a.out, f"kl_sources_{a.split}", {"split": a.split, "config": config.to_dict(), "seconds": seconds,
                                            "prompts": rows}, md)
    console.print(rich_table(f"KL by layer ({a.split})", lh, layer_rows))
    console.print(rich_table(f"KL by prompt ({a.split})", ph, prompt_rows))
    console.print(f"sum of single-layer shares: {total_share:.2f}; written to {a.out}/kl_sources_{a.split}.md")


if __name__ == "__main__":
    main()
