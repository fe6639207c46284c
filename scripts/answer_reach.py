"""Do the answer's own queries tell the rule what a free answer needs? Two measurements.

    python scripts/answer_reach.py [--prompts demo|dev|test|holdout] [--after 8] [--reach] [--out results]

Both use the round-three default (``heads="mean"``, T = 0.05 %), on which docs/results.md reports them.

1. **Planning on the answer's first queries** (every prompt): the default configuration planned after
   the prompt (its newest 32 prompt queries score the positions) against the same rule planned after the
   full cache's first G answer tokens (``--after``) with only those G tokens' queries as score rows
   (``ReFreeKVConfig(query_rows=G)`` on the prompt + G answer tokens; the first G tokens are the full
   cache's by construction, and the peak memory is the prefill's either way). Per prompt: the budget, the
   first answer token that differs from the full cache's (open answers: the full cache's greedy answer is
   the reference), and the KL against the full cache over the tokens after G, teacher-forced (so both
   rules are compared on the same tokens). With ``--prompts SPLIT`` the split's open questions and
   continuations (prompts up to 4k tokens) are used.
2. **How far back each layer's queries reach** (``--reach``; open answers only): per layer, the fraction
   of the prompt's candidate positions (sinks excluded, newest first, as the position ranking keeps them)
   that one query row needs so that the L2 norm of its kept attention is within T of the norm of all of
   it: averaged over heads and rows, for the newest 32 prompt rows (what the default scores with), for
   the answer's rows (the full cache's answer, teacher-forced, eager attention; prompt keys only), and for
   48 rows spread over the prompt (each row's own past, ranked newest first from the row). Per row and
   head, not the rule's combined curve: a diagnostic of reach, not a plan.
Writes answer_reach.md and .json (answer_reach_SPLIT.*).
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    import torch
    from rich.console import Console
    from rich.progress import track

    from refreekv import ReFreeKVConfig
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands.demo import demo_prompts
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write
    from refreekv.commands.runner import _fork, diverges_at, forced, greedy, kl_top1

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", default="demo", choices=["demo", "dev", "test", "holdout"])
    p.add_argument("--after", type=int, default=8, help="plan after this many answer tokens, with their queries")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--reach", action="store_true", help="per-layer reach of prompt and answer queries")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    if not 0 < a.after < a.max_new_tokens:
        p.error(f"--after: received {a.after}; expected an int G with 0 < G < --max-new-tokens ({a.max_new_tokens})")
    console = Console()
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    model, tok = load_torch()
    if a.prompts == "demo":
        prompts = [(name, "open", text, "") for name, text, _ in demo_prompts(tok)]
    else:
        from refreekv.commands.tasks import build
        prompts = [(q.id, q.kind, q.text, q.target) for q in build(tok, a.prompts)
                   if q.kind in ("open", "continuation") and q.length <= 4096]
    # the round-three default (heads="mean", T = 0.05 %), which docs/results.md's numbers of this study used
    base, G = ReFreeKVConfig.evicting(heads="mean", threshold=0.0005), a.after
    late = ReFreeKVConfig.evicting(heads="mean", threshold=0.0005, query_rows=G)
    rows, records, reach = [], [], []
    for name, kind, text, target in track(prompts, description="prompts", console=console):
        if kind == "continuation":
            ids = tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        else:
            ids = tok([text], return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        pre = capture_prefill(model, ids, configs=[base])
        if kind == "continuation":
            answer = tok(target, add_special_tokens=False)["input_ids"]
        else:
            answer = greedy(model, tok, _fork(pre.cache), pre.logits, n, a.max_new_tokens).tokens
        if len(answer) <= G:
            continue  # nothing after the first G tokens to compare
        full_logits = forced(model, _fork(pre.cache), pre.logits, n, answer)[G:]
        ids_g = torch.cat([ids, torch.tensor([answer[:G]])], 1)
        pre_g = capture_prefill(model, ids_g, configs=[late])
        rec = {"prompt": name, "kind": kind, "tokens": n}
        for label, p_, cfg, start in (("prompt", pre, base, 0), ("answer", pre_g, late, G)):
            cache = ReFreeKVCache.from_prefill(p_, cfg)
            budget = float(cache.report.budget[0])
            logits = forced(model, cache, p_.logits, n + start, answer[start:])[G - start:]
            kl, top1 = kl_top1(full_logits, logits)
            at = None
            if kind == "open":
                own = greedy(model, tok, ReFreeKVCache.from_prefill(p_, cfg), p_.logits, n + start,
                             a.max_new_tokens - start).tokens
                at = diverges_at(answer[:start] + own, answer)
            rec[label] = {"budget": budget, "kl_after_G": kl, "top1_after_G": top1, "diverges_at": at}
        records.append(rec)
        rows.append([name, n, *(x for label in ("prompt", "answer") for x in (
            f"{rec[label]['budget']:.1%}", f"{rec[label]['kl_after_G']:.4f}",
            "-" if kind != "open" else ("same" if rec[label]["diverges_at"] is None else
                                        f"token {rec[label]['diverges_at']}")))])
        if a.reach and kind == "open":
            kept = {r.layer: r.kept[0] / r.prompt_lengths[0] for r in ReFreeKVCache.from_prefill(pre, base).report.layers}
            for layer, (last, ans, spread) in enumerate(layer_reach(model, ids, answer, base)):
                reach.append({"prompt": name, "layer": layer, "kept": kept.get(layer, 1.0), "last_rows": last,
                              "answer_rows": ans, "spread_rows": spread})
    headers = ["prompt", "tokens", "budget (planned after the prompt)", f"KL after token {G}", "answer vs full",
               f"budget (planned after {G} answer tokens, their queries)", f"KL after token {G}", "answer vs full"]
    seconds = time.perf_counter() - t0
    md = (f"# The answer's own queries as score rows ({a.prompts} prompts, planned after {G} answer tokens; "
          f"{seconds:.0f} s)\n\n" + markdown_table(headers, rows))
    summary = summarize(records)
    md += "\n\n" + markdown_table(["rule", "mean budget", "mean KL after token G", "open answers = full"],
                                  [[k, f"{v['budget']:.1%}", f"{v['kl']:.4f}", v["same"]] for k, v in summary.items()])
    if reach:
        md += ("\n\n## How far back each layer's queries reach (fraction of the prompt's candidate positions one "
               "row needs, newest first, for its L2 norm within T; mean over heads and rows)\n\n" +
               markdown_table(["prompt", "layer", "kept by the default", "newest 32 prompt rows", "answer rows",
                               "48 rows spread over the prompt"],
                              [[r["prompt"], r["layer"], f"{r['kept']:.1%}", f"{r['last_rows']:.2f}",
                                f"{r['answer_rows']:.2f}", f"{r['spread_rows']:.2f}"] for r in reach]))
    stem = "answer_reach" if a.prompts == "demo" else f"answer_reach_{a.prompts}"
    write(a.out, stem, {"records": records, "reach": reach, "summary": summary, "after": G, "seconds": seconds}, md)
    console.print(rich_table("planning on the answer's first queries", headers, rows))
    console.print(summary)
    console.print(f"{seconds:.0f} s; written to {a.out}/{stem}.md and .json")


def summarize(records: list[dict]) -> dict:
    out = {}
    for label in ("prompt", "answer"):
        opens = [r for r in records if r["kind"] == "open"]
        out[label] = {"budget": sum(r[label]["budget"] for r in records) / max(1, len(records)),
                      "kl": sum(r[label]["kl_after_G"] for r in records) / max(1, len(records)),
                      "same": f"{sum(r[label]['diverges_at'] is None for r in opens)}/{len(opens)}"}
    return out


def needed(weights, end: int, sinks: int, T: float):
    """weights (H, R, K): per head and row, the fraction of candidate keys ``sinks..end-1`` (newest
    first) needed so that the L2 norm of the kept entries is >= (1 - T) of all of them: (H, R)."""
    cand = weights[..., sinks:end].double().flip(-1) ** 2
    cum = cand.cumsum(-1)
    ok = cum >= (1 - T) ** 2 * cum[..., -1:]
    return (ok.double().argmax(-1) + 1) / (end - sinks)


def eager_forward(model, ids, hook) -> None:
    """One forward over ``ids`` with eager attention (no cache); ``hook(layer)`` makes each attention
    module's forward hook (with kwargs; it sees the attention weights as ``output[1]``)."""
    from refreekv.adapters.transformers import attention_modules

    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(attention_modules(model))]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(before)


def layer_reach(model, ids, answer: list[int], cfg) -> list[tuple[float, float, float]]:
    """(newest 32 prompt rows, answer rows, rows spread over the prompt) reach per layer, from one
    eager forward over prompt + answer (each layer's attention reduced inside its hook)."""
    import numpy as np
    import torch

    n = ids.shape[1]
    spread = np.linspace(n // 4, n - 33, 48).astype(int)
    out: dict[int, tuple[float, float, float]] = {}

    def hook(layer):
        def reduce(module, args, kwargs, output):
            w = output[1][0]  # (H, q, k): eager attention weights
            last = needed(w[:, n - 32:n], n, cfg.sinks, cfg.threshold).mean()
            ans = needed(w[:, n:], n, cfg.sinks, cfg.threshold).mean()
            sp = torch.stack([needed(w[:, r:r + 1], r + 1, cfg.sinks, cfg.threshold) for r in spread]).mean()
            out[layer] = (float(last), float(ans), float(sp))
            return (output[0], None)
        return reduce

    eager_forward(model, torch.cat([ids, torch.tensor([answer])], 1), hook)
    return [out[i] for i in sorted(out)]


if __name__ == "__main__":
    main()
