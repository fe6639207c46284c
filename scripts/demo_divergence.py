"""Where and how firmly a compressed answer of `refreekv demo` leaves the full cache's.

    python scripts/demo_divergence.py [--max-new-tokens 24] [--thresholds 0.0002,0.0001] [--layer-study]
                                      [--delays 4,8] [--prompts demo|dev|test|holdout] [--out results]

Each demo prompt is prefilled once. The full cache decodes greedily; its answer is then teacher-forced
to get the full cache's top-1 / top-2 log-probability margin at every answer token. For the default
(``heads="each"``, T = 0.125 %, since round four), the default before round four (``heads="mean"``,
T = 0.05 %), T = 0.1 % (the default before round three), the 3 % mass floor and the smaller thresholds
(all with ``heads="mean"``, as measured before round four)
of ``--thresholds`` (where does a free-text answer meet the full cache's, and at what budget?), from copies of the same prefill: the compressed answer, the first
token where it differs from the full cache's and the full cache's margin there (a margin near 0 would
be a near-tie that any rounding flips; a large one means the compression moved the distribution). Two
changes that keep attention exact, a prefill in two chunks and eager attention instead of SDPA, say
whether the full cache's own answer is stable. With ``--layer-study``, for every prompt whose default
answer differs: which layers make it differ (each layer kept whole alone, each compressed alone, the
layers that keep less than half of the prompt kept whole together and compressed alone together).
``--delays G1,G2``: the default planned after the first G tokens of the full cache's answer instead of
after the prompt (the newest 32 score rows then include those G answer tokens' queries; the peak memory
is the prefill's either way): does an answer's own start tell the rule what the answer needs?
``--prompts SPLIT`` studies the open questions of an eval split instead of the demo's prompts (the
full cache's answer is their reference too). Writes demo_divergence.md and .json (demo_divergence_SPLIT.*).
"""

from __future__ import annotations

import argparse
import itertools
import time
from functools import partial


def main(argv=None) -> None:
    import torch
    from rich.console import Console
    from transformers import DynamicCache

    from refreekv import ReFreeKVConfig
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands.demo import demo_prompts
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write
    from refreekv.commands.runner import _fork, diverges_at, forced, greedy

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--thresholds", default="0.0002,0.0001", help="more thresholds T to try, comma-separated")
    p.add_argument("--out", default="results")
    p.add_argument("--layer-study", action="store_true", help="which layers make the default's answer differ")
    p.add_argument("--delays", default="", help="also plan after the first G answer tokens, comma-separated Gs")
    p.add_argument("--prompts", default="demo", choices=["demo", "dev", "test", "holdout"],
                   help="the demo's prompts, or the open questions of an eval split")
    a = p.parse_args(argv)
    if a.max_new_tokens < 1:
        p.error(f"--max-new-tokens: received {a.max_new_tokens}; expected an int >= 1")
    try:
        Ts = [float(x) for x in a.thresholds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--thresholds: received {a.thresholds!r}; expected comma-separated numbers, e.g. 0.0002,0.0001")
    if not all(0 <= T < 1 for T in Ts):
        p.error(f"--thresholds: received {a.thresholds!r}; expected numbers T with 0 <= T < 1")
    try:
        delays = [int(x) for x in a.delays.split(",") if x.strip()]
    except ValueError:
        delays = [-1]
    if not all(0 < g < a.max_new_tokens for g in delays):
        p.error(f"--delays: received {a.delays!r}; expected comma-separated ints G with 0 < G < --max-new-tokens")
    console = Console()
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    model, tok = load_torch()
    M = partial(ReFreeKVConfig.evicting, heads="mean")  # the rules measured before round four
    configs = {"default (heads each, T = 0.125 %)": ReFreeKVConfig.evicting(),
               "T = 0.05 % (default before round four)": M(threshold=0.0005),
               "T = 0.1 % (default before round three)": M(threshold=0.001),
               "mass floor 3 % (T = 0.1 %)": M(threshold=0.001, mass_threshold=0.03)}
    configs |= {f"T = {T:.3%}": M(threshold=T) for T in Ts}
    rows, records, study = [], [], []
    if a.prompts == "demo":
        prompts = [(name, prompt) for name, prompt, _ in demo_prompts(tok)]
    else:
        from refreekv.commands.tasks import build
        prompts = [(p.id, p.text) for p in build(tok, a.prompts) if p.kind == "open"]
    for name, prompt in prompts:
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        pre = capture_prefill(model, ids, configs=list(configs.values()))
        full = greedy(model, tok, _fork(pre.cache), pre.logits, n, a.max_new_tokens)
        top2 = forced(model, _fork(pre.cache), pre.logits, n, full.tokens).log_softmax(-1).topk(2, -1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        chunked = DynamicCache(config=model.config)
        model(input_ids=ids[:, :n // 2], cache=chunked)
        first = model(input_ids=ids[:, n // 2:], cache=chunked).logits[:, -1]
        stable_chunked = greedy(model, tok, chunked, first, n, a.max_new_tokens).tokens == full.tokens
        for cname, cfg in configs.items():
            compressed = ReFreeKVCache.from_prefill(pre, cfg)
            budget = float(compressed.report.budget[0])
            ours = greedy(model, tok, compressed, pre.logits, n, a.max_new_tokens)
            at = diverges_at(ours.tokens, full.tokens)
            m = margin[at] if at is not None and at < len(margin) else None
            records.append({"prompt": name, "config": cname, "tokens": n, "budget": budget, "same": at is None,
                            "diverges_at": at,
                            "full_margin_there": m, "full_min_margin": min(margin), "answer_full": full.text,
                            "answer": ours.text, "full_same_with_chunked_prefill": stable_chunked})
            rows.append([name, cname, f"{budget:.1%}", "same" if at is None else f"token {at}", "" if m is None else f"{m:.3f}",
                         f"{min(margin):.3f}", "yes" if stable_chunked else "no"])
        default_same = records[-len(configs)]["same"]  # the first configuration is the default
        for g in (g for g in delays if g < len(full.tokens)):  # plan after the full cache's first g answer
            # tokens (identical by construction); an answer of at most g tokens has nothing left to compare
            ids_g = torch.cat([ids, torch.tensor([full.tokens[:g]])], 1)
            pre_g = capture_prefill(model, ids_g, configs=[ReFreeKVConfig.evicting()])
            compressed = ReFreeKVCache.from_prefill(pre_g, ReFreeKVConfig.evicting())
            tokens = full.tokens[:g] + greedy(model, tok, compressed, pre_g.logits, n + g, a.max_new_tokens - g).tokens
            at = diverges_at(tokens, full.tokens)
            m = margin[at] if at is not None and at < len(margin) else None
            budget = float(compressed.report.budget[0])
            records.append({"prompt": name, "config": f"default, planned after {g} answer tokens", "tokens": n,
                            "budget": budget, "same": at is None, "diverges_at": at, "full_margin_there": m,
                            "full_min_margin": min(margin), "answer_full": full.text, "answer": tok.decode(tokens),
                            "full_same_with_chunked_prefill": stable_chunked})
            rows.append([name, f"default, planned after {g} answer tokens", f"{budget:.1%}",
                         "same" if at is None else f"token {at}", "" if m is None else f"{m:.3f}",
                         f"{min(margin):.3f}", "yes" if stable_chunked else "no"])
        if a.layer_study and not default_same:
            study += layer_study(model, tok, pre, full, n, a.max_new_tokens, name)
    # Eager attention: the same prompts' full-cache answers (a different attention kernel, exact math).
    model.config._attn_implementation = "eager"
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    for name, prompt in prompts:
        ids = tok([prompt], return_tensors="pt")["input_ids"]
        cache = DynamicCache(config=model.config)
        first = model(input_ids=ids, cache=cache).logits[:, -1]
        same = greedy(model, tok, cache, first, ids.shape[1], a.max_new_tokens).text == \
            next(r["answer_full"] for r in records if r["prompt"] == name)
        for r, row in zip(records, rows):
            if r["prompt"] == name:
                r["full_same_with_eager"] = same
                row.append("yes" if same else "no")
    headers = ["prompt", "config", "budget", "answer vs full", "full margin there (nats)", "full's smallest margin",
               "full same, chunked prefill", "full same, eager"]
    seconds = time.perf_counter() - t0
    md = (f"# Where the demo's compressed answers leave the full cache's ({a.max_new_tokens} new tokens, "
          f"{seconds:.0f} s)\n\n" + markdown_table(headers, rows))
    if study:
        md += ("\n\n## Which layers make the default's answer differ (`--layer-study`)\n\n"
               + markdown_table(STUDY_HEADERS, [[r[h] for h in STUDY_KEYS] for r in study]))
    stem = "demo_divergence" if a.prompts == "demo" else f"demo_divergence_{a.prompts}"
    if a.prompts != "demo":
        md = md.replace("the demo's compressed answers", f"the {a.prompts} split's open answers", 1)
    write(a.out, stem, {"records": records, "layer_study": study, "seconds": seconds}, md)
    console.print(rich_table("demo divergence", headers, rows))
    console.print(f"{seconds:.0f} s; written to {a.out}/{stem}.md and .json")


STUDY_HEADERS = ["prompt", "layers compressed (the rest kept whole)", "budget", "answer vs full"]
STUDY_KEYS = ["prompt", "compressed", "budget", "answer"]


def layer_study(model, tok, pre, full, n: int, max_new: int, name: str) -> list[dict]:
    """The default configuration with some layers kept whole (``retained_layers``), from the same prefill."""
    from refreekv import ReFreeKVConfig
    from refreekv.adapters.transformers import ReFreeKVCache
    from refreekv.commands.runner import diverges_at, greedy

    base = ReFreeKVConfig.evicting()
    report = ReFreeKVCache.from_prefill(pre, base).report
    layers = len(report.layers)
    kept = {r.layer: r.kept[0] / r.prompt_lengths[0] for r in report.layers}
    low = sorted(k for k, f in kept.items() if f < 0.5 and not base.is_retained(k))
    every = [k for k in range(layers) if not base.is_retained(k)]

    def run(compressed: list[int], label: str) -> dict:
        cfg = ReFreeKVConfig.evicting(retained_layers=tuple(k for k in range(layers) if k not in compressed))
        cache = ReFreeKVCache.from_prefill(pre, cfg)
        ours = greedy(model, tok, cache, pre.logits, n, max_new)
        at = diverges_at(ours.tokens, full.tokens)
        return {"prompt": name, "compressed": label, "budget": f"{float(cache.report.budget[0]):.1%}",
                "answer": "same" if at is None else f"token {at}", "layers": compressed, "same": at is None}

    out = [run(every, "all (the default)"),
           run([k for k in every if k not in low], f"all but the {len(low)} keeping < 50 % ({low})"),
           run(low, f"only the {len(low)} keeping < 50 % ({low})")]
    alone = [run([k], f"only layer {k}") for k in every]
    changed = [r["layers"][0] for r in alone if not r["same"]]
    rescued = [k for k in every if run([x for x in every if x != k], "")["same"]]
    out.append({"prompt": name, "compressed": "one layer alone, each in turn", "budget": "",
                "answer": f"differs when compressing only layer(s) {changed}" if changed else "same for every layer",
                "layers": changed, "same": not changed})
    out.append({"prompt": name, "compressed": "all but one layer, each in turn", "budget": "",
                "answer": f"same when keeping layer(s) {rescued} whole" if rescued else
                "differs whichever one layer is kept whole", "layers": rescued, "same": bool(rescued)})
    pairs = [list(p) for p in itertools.combinations(low, 2) if not run(list(p), "")["same"]]
    out.append({"prompt": name, "compressed": f"two of the {len(low)} keeping < 50 %, each pair", "budget": "",
                "answer": f"differs when compressing only {pairs}" if pairs else "same for every pair",
                "layers": pairs, "same": not pairs})
    return out


if __name__ == "__main__":
    main()
