"""Which layer's eviction lost a needle: the answer with one compressed layer at a time given back whole.

    python scripts/needle_sources.py test/needle/7500/d0.9/p1 [--threshold ...] [--out results]

The prompt (a needle or multi-key prompt id of ``refreekv eval``'s grid) is prefilled once and
compressed with the configuration (the library's default unless options say otherwise). From copies
of that prefill it decodes greedily, as ``refreekv eval`` does: the full cache, the compressed
cache, for every compressed layer l the compressed cache with layer l whole, then with every layer
whose kept tokens do not reach back to the needle whole, and with every layer whole but one (only
that one compressed). Prints, per
row, the tokens kept, whether the needle is among the layer's newest kept tokens, the answer and
whether it is right. Writes needle_sources_<id>.md and .json.
"""

from __future__ import annotations

import argparse
import time



def main(argv=None) -> None:
    import torch
    from rich.console import Console

    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.cli import _config_args, config_from
    from refreekv.commands import runner
    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, rich_table, write
    from refreekv.commands.tasks import build

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("prompt", help="a prompt id of the eval grid, e.g. test/needle/7500/d0.9/p1")
    p.add_argument("--out", default="results")
    _config_args(p)
    a = p.parse_args(argv)
    split = a.prompt.split("/")[0]
    if split not in ("dev", "test"):
        p.error(f"prompt: received {a.prompt!r}; expected an id that starts with dev/ or test/")
    config = config_from(a)
    t0 = time.perf_counter()
    model, tok = load_torch()
    prompts = {q.id: q for q in build(tok, split)}
    if a.prompt not in prompts or prompts[a.prompt].kind not in ("needle", "multikey"):
        p.error(f"prompt: received {a.prompt!r}; expected a needle or multi-key id of the {split} split, e.g. "
                f"{next(i for i, q in prompts.items() if q.kind == 'needle')}")
    prompt = prompts[a.prompt]
    ids = tok([prompt.text], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    # where the expected answer sits: tokens from its first occurrence to the end of the prompt
    at = prompt.text.index(prompt.expect)
    back = n - len(tok(prompt.text[:at], add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        pre = capture_prefill(model, ids, configs=[config])
        full = runner._fork(pre.cache)
        cache = ReFreeKVCache.from_prefill(pre, config)
        kept = [r.kept[0] for r in cache.report.layers]
        L = len(kept)
        compressed = [i for i in range(L) if kept[i] < n]
        reaches = {i: kept[i] - min(config.sinks, kept[i]) >= back for i in range(L)}  # newest run holds it
        lost = [i for i in compressed if not reaches[i]]  # given back together (a row of its own if 2 or more)
        others = [[j for j in compressed if j != i] for i in compressed]  # only layer i compressed
        groups = [[i] for i in compressed] + ([lost] if len(lost) > 1 else []) + others
        mixes = [runner.Layers.mixed(full, cache, set(g)) for g in groups]
        answers = runner.greedy_many(model, tok, [full, cache, *mixes], pre.logits, n,
                                     runner.ANSWER_TOKENS[prompt.kind], prompt.expect, number=True)
    ok = [prompt.expect in x.text for x in answers]

    def label(g):
        if len(g) == 1:
            return str(g[0])
        if g == lost:
            return "all layers that dropped the needle: " + ", ".join(map(str, lost))
        return "all but " + str(next(i for i in compressed if i not in g)) + " (only it compressed)"

    rows = [[label(g), "-" if len(g) != 1 else kept[g[0]], "-" if len(g) != 1 else ("yes" if reaches[g[0]] else "no"),
             answers[2 + j].text.strip(), "right" if ok[2 + j] else "wrong"] for j, g in enumerate(groups)]
    headers = ["layers given back whole", "kept by the layer", "needle among its newest tokens", "answer", "verdict"]
    seconds = time.perf_counter() - t0
    md = (f"# Which layer lost the answer: {prompt.id}\n\n`python scripts/needle_sources.py {prompt.id}`, "
          f"{'the default configuration' if config == type(config)() else config}; {seconds:.0f} s.\n\n"
          f"n = {n} tokens; the expected answer ({prompt.expect}) starts {back} tokens before the end of the prompt. "
          f"Budget {cache.report.budget[0]:.1%}.\n\n"
          f"- full cache: {answers[0].text.strip()!r} ({'right' if ok[0] else 'wrong'})\n"
          f"- compressed: {answers[1].text.strip()!r} ({'right' if ok[1] else 'wrong'})\n\n"
          + markdown_table(headers, rows))
    name = "needle_sources_" + prompt.id.replace("/", "_")
    write(a.out, name, {"prompt": prompt.id, "n": n, "back": back, "expect": prompt.expect, "kept": kept,
                        "config": config.to_dict(), "seconds": seconds,
                        "answers": {"full": answers[0].text, "compressed": answers[1].text,
                                    **{label(g): answers[2 + j].text for j, g in enumerate(groups)}}}, md)
    console = Console()
    console.print(f"full: {answers[0].text.strip()!r}  compressed: {answers[1].text.strip()!r}  "
                  f"(needle {back} tokens back of {n})")
    console.print(rich_table(f"one layer whole ({prompt.id})", headers, rows))


if __name__ == "__main__":
    main()
