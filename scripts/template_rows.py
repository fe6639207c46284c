"""An exploratory scoring rule, NOT a configuration of the library: score rows that skip the chat
template's own tokens.

    python scripts/template_rows.py --split dev [--thresholds 0.001] [--max-length 4096] [--limit N] [--out results]

The default scores positions with the newest 32 prompt queries (paper Eq. 2). On a chat prompt the
newest few of them are the chat template's closing tokens (SmolLM2: ``<|im_end|>``, ``\\n``,
``<|im_start|>``, ``assistant``, ``\\n``: m = 5), whose attention the paper's single query row showed to
look almost only at the sinks and at other template tokens. Issue 10 lists "rows that skip the chat
template's own tokens" in the design space; this script measures it. "skip": the 32 query rows are the
32 positions before the newest m (m = the template's closing tokens, counted from the tokenizer's own
template), the rule (T, L2 norm ratio, candidates scope, mean over heads, layers 0 and 1 whole) runs
over the first n - m positions, and the newest m positions are kept as the position ranking always
keeps its newest tokens first. That is what a ``skip_rows = m`` setting would do: applied to every
prompt, the continuations (plain text, no template) included, where it scores with the rows before
the newest m tokens of text.

Every prompt of the split up to --max-length is prefilled once (its newest 32 + m input rows
captured); the full cache, the default and "skip" decode together from copies of that prefill
(needles, multi-key: greedy answers; continuations: teacher-forced KL and top-1 against the full
cache; open questions: KL over the full cache's own answer). Writes template_rows_<split>.md and .json.
It stays a script unless the dev split shows a gain (docs/results.md).
"""

from __future__ import annotations

import time

import torch

_MARK = "\x00REFREEKV\x00"


def template_tail(tok) -> int:
    """How many tokens the chat template adds after the user's message (its closing tokens and the
    generation prompt): the m newest positions of every chat prompt built by ``prompts.chat``."""
    full = tok.apply_chat_template([{"role": "user", "content": "The answer is" + _MARK}],
                                   add_generation_prompt=True, tokenize=False)
    head, tail = full.split(_MARK)
    n_head = len(tok(head)["input_ids"])
    n_all = len(tok(head + tail)["input_ids"])
    return n_all - n_head


@torch.no_grad()
def skipped(pre, cfg, m: int) -> tuple[list, list[int]]:
    """Per layer the K/V "skip" keeps and its kept count, from a prefill whose captured rows
    include the newest ``rows_for(n) + m`` positions."""
    import refreekv
    from refreekv.adapters.transformers import _queries
    from refreekv.commands.explore import KeptLayer

    if m < 1:
        raise ValueError(f"m: received {m}; expected an int >= 1 (m = 0 is the default itself)")
    layers, kept = [], []
    for i, (c, layer) in enumerate(zip(pre.captured, pre.cache.layers)):
        K, V = layer.keys, layer.values
        n = K.shape[-2]
        if cfg.is_retained(i):
            layers.append(KeptLayer(K, V))
            kept.append(n)
            continue
        k = cfg.rows_for(n - m)
        sl = slice(-(k + m), -m)
        rows = _queries(c.module, c.hidden[:, sl], c.cos[:, sl], c.sin[:, sl])
        k2, v2, _, report, _ = refreekv.compress_layer(rows, K[:, :, :n - m], V[:, :, :n - m], cfg, layer=i,
                                                    scale=c.module.scaling)
        layers.append(KeptLayer(torch.cat([k2, K[:, :, n - m:]], 2), torch.cat([v2, V[:, :, n - m:]], 2)))
        kept.append(int(report.kept[0]) + m)
    return layers, kept


def main(argv=None) -> None:
    import difflib

    from rich.console import Console
    from rich.progress import track

    from refreekv import ReFreeKVConfig
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands import runner
    from refreekv.commands.explore import continuation_args
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write
    from refreekv.commands.tasks import build

    a, Ts = continuation_args(__doc__.split("\n")[0], "0.001", argv, limit_help="only the first N prompts of each kind",
                              max_length=4096)
    t0 = time.perf_counter()
    model, tok = load_torch()
    m = template_tail(tok)
    cfgs = [ReFreeKVConfig.evicting(threshold=T) for T in Ts]
    prompts, seen = [], {}
    for q in build(tok, a.split):
        if q.length <= a.max_length and (a.limit is None or seen.get(q.kind, 0) < a.limit):
            seen[q.kind] = seen.get(q.kind, 0) + 1
            prompts.append(q)
    records = []
    for prompt in track(prompts, description=f"{a.split}: template rows (m = {m})"):
        plain = prompt.kind == "continuation"
        ids = tok([prompt.text], return_tensors="pt", add_special_tokens=not plain)["input_ids"]
        n = ids.shape[1]
        pre = capture_prefill(model, ids, rows=max(c.rows_needed(n) for c in cfgs) + m)
        caches, names = [runner._fork(pre.cache)], [("full", 0.0, [n] * len(pre.cache.layers))]
        for T, cfg in zip(Ts, cfgs):
            cache = ReFreeKVCache.from_prefill(pre, cfg)
            caches.append(cache)
            names.append(("default", T, [r.kept[0] for r in cache.report.layers]))
            layers, kept = skipped(pre, cfg, m)
            caches.append(runner.Layers(layers))
            names.append(("skip", T, kept))
        base = {"prompt": prompt.id, "kind": prompt.kind, "length": prompt.length, "n": n}
        if prompt.kind in ("continuation", "open"):
            if plain:
                targets = tok(prompt.target, add_special_tokens=False)["input_ids"]
            else:
                answers = runner.greedy_many(model, tok, caches, pre.logits, n, runner.ANSWER_TOKENS["open"])
                targets = answers[0].tokens
            logits = runner.forced_many(model, caches, pre.logits, n, targets)
            for i, ((mode, T, kept), lg) in enumerate(zip(names, logits)):
                kl, top1 = runner.kl_top1(logits[0], lg)
                rec = base | {"mode": mode, "T": T, "budget": sum(kept) / (len(kept) * n), "kept": kept,
                              "kl": kl, "top1": top1}
                if not plain:
                    rec |= {"answer": answers[i].text, "same": answers[i].tokens == answers[0].tokens,
                            "similarity": difflib.SequenceMatcher(None, answers[i].tokens, answers[0].tokens).ratio()}
                records.append(rec)
        else:
            answers = runner.greedy_many(model, tok, caches, pre.logits, n, runner.ANSWER_TOKENS[prompt.kind],
                                         prompt.expect, number=True)
            for (mode, T, kept), ans in zip(names, answers):
                records.append(base | {"mode": mode, "T": T, "budget": sum(kept) / (len(kept) * n), "kept": kept,
                                       "answer": ans.text, "ok": prompt.expect in ans.text,
                                       "full_ok": prompt.expect in answers[0].text})

    def row(name, rs):
        import numpy as np

        b = [r["budget"] for r in rs]
        needles = [r for r in rs if r["kind"] == "needle"]
        mk = [r for r in rs if r["kind"] == "multikey"]
        cont = [r for r in rs if r["kind"] == "continuation"]
        opn = [r for r in rs if r["kind"] == "open"]
        lengths = sorted({r["length"] for r in needles})
        per = " / ".join(str(sum(r["ok"] for r in needles if r["length"] == L)) for L in lengths)
        lost = sum(r["full_ok"] and not r["ok"] for r in needles + mk)
        chat_b = [r["budget"] for r in rs if r["kind"] != "continuation"]
        return [name, f"{np.mean(b):.1%} ({min(b):.0%}-{max(b):.0%})",
                f"{np.mean(chat_b):.1%}" if chat_b else "-",
                f"{sum(r['ok'] for r in needles)}/{len(needles)} ({per})" if needles else "-",
                f"{sum(r['ok'] for r in mk)}/{len(mk)}" if mk else "-", str(lost),
                f"{np.mean([r['kl'] for r in cont]):.4f}" if cont else "-",
                f"{np.mean([r['top1'] for r in cont]):.3f}" if cont else "-",
                f"{np.mean([r['kl'] for r in opn]):.4f}" if opn else "-",
                f"{sum(r['same'] for r in opn)}/{len(opn)}" if opn else "-"]

    lengths = sorted({q.length for q in prompts if q.kind == "needle"})
    headers = ["rows", "budget (min-max)", "budget, chat prompts", f"needles ({' / '.join(map(str, lengths))})",
               "multi-key", "lost vs full", "cont. KL", "top-1", "open KL", "open = full"]
    table = [row("full", [r for r in records if r["mode"] == "full"])]
    for T in Ts:
        for mode, label in (("default", "default: the newest 32"), ("skip", f"skip: 32 before the newest {m}")):
            table.append(row(f"T={T:g} {label}", [r for r in records if r["T"] == T and r["mode"] == mode]))
    seconds = time.perf_counter() - t0
    cmd = f"python scripts/template_rows.py --split {a.split} --thresholds {a.thresholds} --max-length {a.max_length}" + \
        (f" --limit {a.limit}" if a.limit else "")
    md = (f"# Score rows that skip the chat template ({a.split} split, exploratory)\n\n"
          f"`{cmd}`: {len(prompts)} prompts, {seconds:.0f} s. m = {m} template tokens close every chat prompt. "
          "`default`: the library's rule, scored by the newest 32 queries; `skip`: the same rule scored by the 32 "
          f"queries before the newest {m} positions, over the first n - {m} positions, the newest {m} kept "
          "(applied to every prompt, the continuations' plain text included). Budget: mean over layers of "
          "kept / n, layers 0 and 1 counting 1.\n\n" + markdown_table(headers, table))
    write(a.out, f"template_rows_{a.split}", {"split": a.split, "thresholds": Ts, "m": m, "seconds": seconds,
                                               "command": cmd, "records": records}, md)
    Console().print(rich_table(f"template rows ({a.split})", headers, table))


if __name__ == "__main__":
    main()
