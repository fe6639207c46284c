"""An exploratory split of the rule, NOT a configuration of the library: the default's per-layer budget,
tokens chosen by attention.

    python scripts/score_selection.py --split dev [--thresholds 0.001,0.0005] [--out results]

The threshold rule does two things at once: it decides HOW MANY tokens a layer keeps (the shortest
prefix of the position ranking whose L2 norm ratio is within T) and WHICH (that prefix: the sinks and
the newest run). scripts/kl_sources.py found the layers cut to 3-7 % putting 6-25 % of their score rows'
attention on the tokens they evict, so this script keeps the count and changes the choice: per layer and
KV head, the same number of tokens, picked by the SnapKV score of the default's 32 score rows
(their attention, averaged per KV group, max-pooled over 7 positions), sinks and the newest 32 first
("score"); or half of the count as the newest run and the rest by that score ("half"). Every layer
keeps exactly what the default keeps at the same T, so the mean budget is the same and only the choice
of tokens differs. Layers 0 and 1 are kept whole, as in the default.

Each continuation of the split is prefilled once; all methods are evaluated from that prefill,
teacher-forced on the 128 continuation tokens: KL(full || method) per token and top-1 agreement.
It stays a script because choosing by attention did not lower the KL at equal budget on dev
(docs/results.md). Writes score_selection_<split>.md and .json to --out.
"""

from __future__ import annotations

import time

import torch

MODES = ("position", "score", "half")


def selected(scores: torch.Tensor, count: int, sinks: int, window: int, mode: str) -> torch.Tensor:
    """Kept positions (1, Hkv, count), ascending, per KV head. scores: (1, Hkv, n), higher = keep.

    "score": the sinks, the newest ``window`` tokens, then the highest scores (``api.attention_ranking``).
    "half": the sinks, the newest ``(count - sinks) // 2`` tokens, then the highest scores."""
    from refreekv import api

    n = scores.shape[-1]
    if mode == "score":
        order = api.attention_ranking(scores, sinks=sinks, window=window)
        return order[..., :count].sort(-1).values
    if mode != "half":
        raise ValueError(f"mode: received {mode!r}; expected 'score' or 'half'")
    run = (count - sinks) // 2
    s = scores.clone()
    s[..., :sinks] = float("inf")
    s[..., n - run:] = float("inf")
    return s.topk(count, -1).indices.sort(-1).values


def main(argv=None) -> None:
    from rich.console import Console
    from rich.progress import track

    from refreekv import ReFreeKVConfig, api
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands import runner
    from refreekv.commands.explore import COLUMNS, KeptLayer, continuation_args, continuations, summary_row
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write

    a, Ts = continuation_args(__doc__.split("\n")[0], "0.001,0.0005", argv)
    t0 = time.perf_counter()
    model, tok = load_torch()
    cfgs = [ReFreeKVConfig.evicting(threshold=T) for T in Ts]
    rows, window, pool = cfgs[0].rows_for(2048), 32, 7
    prompts = continuations(tok, a.split, a.limit)
    records = []
    for prompt, ids, targets in track(prompts, description=f"{a.split} continuations"):
        n = ids.shape[1]
        pre = capture_prefill(model, ids, configs=cfgs)
        with torch.no_grad():
            scores = [api.snapkv_scores(c.queries(rows), layer.keys, window=window, pool_kernel=pool)
                      for c, layer in zip(pre.captured, pre.cache.layers)]
        caches, names = [], []
        for T, cfg in zip(Ts, cfgs):
            cache = ReFreeKVCache.from_prefill(pre, cfg)
            kept = [r.kept[0] for r in cache.report.layers]
            caches.append(cache)
            names.append(("position", T, kept))
            for mode in MODES[1:]:
                layers = []
                for layer, s, m in zip(pre.cache.layers, scores, kept):
                    if m >= n:
                        layers.append(KeptLayer(layer.keys, layer.values))
                        continue
                    idx = selected(s, m, cfg.sinks, window, mode)[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
                    layers.append(KeptLayer(layer.keys.gather(2, idx), layer.values.gather(2, idx)))
                caches.append(runner.Layers(layers))
                names.append((mode, T, kept))
        logits = runner.forced_many(model, [runner._fork(pre.cache), *caches], pre.logits, n, targets)
        for (mode, T, kept), lg in zip(names, logits[1:]):
            kl, top1 = runner.kl_top1(logits[0], lg)
            records.append({"prompt": prompt.id, "mode": mode, "T": T, "n": n, "budget": sum(kept) / (len(kept) * n),
                            "kl": kl, "top1": top1})
    table = []
    for T in Ts:
        for mode in MODES:
            table.append(summary_row(f"T={T:g} {mode}", [r for r in records if r["T"] == T and r["mode"] == mode]))
    headers = ["budget rule, choice", *COLUMNS]
    seconds = time.perf_counter() - t0
    md = (f"# The default's per-layer budget, tokens chosen by attention ({a.split} split, exploratory)\n\n"
          f"`python scripts/score_selection.py --split {a.split} --thresholds {a.thresholds}`: "
          f"{len(prompts)} continuations, {seconds:.0f} s. Per layer the count of the default's rule at T; "
          "`position`: the library's choice (sinks and the newest run); `score`: sinks, the newest 32, then the "
          "SnapKV score of the 32 score rows (per KV head); `half`: half the count as the newest run, the rest by "
          "that score. Layers 0 and 1 whole.\n\n" + markdown_table(headers, table))
    write(a.out, f"score_selection_{a.split}", {"split": a.split, "thresholds": Ts, "seconds": seconds,
                                                "records": records}, md)
    Console().print(rich_table(f"score selection ({a.split})", headers, table))


if __name__ == "__main__":
    main()
