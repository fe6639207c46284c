"""ReFreeKV against kvpress's presses in kvpress's own pipeline (issue 13), on the packaged SmolLM2.

Run in the kvpress environment that scripts/install.sh makes:

    .venv-kvpress/bin/python scripts/kvpress_compare.py --out results [--prompts 12]

Prompts: needle prompts of the test split (1k and 2k tokens, depths 10/50/90 %, two phrasings) and
multi-key prompts (2k), each in two settings through `pipeline("kv-press-text-generation")`:
"inside" (the question is part of the compressed context and asked again after it) and "after"
(only the text is compressed; the question comes after it). Presses: none (full cache), ReFreeKV's
default and the paper's configuration, and kvpress's SnapKV, StreamingLLM, Knorm,
ExpectedAttention and AdaKV (over SnapKV) at compression ratios 0.3 and 0.5 (budgets 70 % and 50 %,
around ReFreeKV's own), and DMS over Knorm (kvpress 0.5.5 gives DMS no default threshold; we run
the two thresholds named below, or thresholds calibrated on a dev prompt with --dms-keep). Per press:
accuracy, budget kept, whether memory is really freed, press time per layer (its forward hooks,
timed), peak RSS. Writes kvpress_compare.{json,md,png}. --only runs some presses (e.g. --only dms).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def presses(dms_thresholds=(-2.0, -3.0)):
    from kvpress import (AdaKVPress, DMSPress, ExpectedAttentionPress, KnormPress, SnapKVPress,
                         StreamingLLMPress)

    from refreekv import ReFreeKVConfig
    from refreekv.adapters.kvpress import ReFreeKVPress

    out = {"full": None, "refreekv (default)": ReFreeKVPress(), "refreekv (paper)": ReFreeKVPress(ReFreeKVConfig.paper())}
    for ratio in (0.3, 0.5):
        out[f"snapkv {1 - ratio:.0%}"] = SnapKVPress(compression_ratio=ratio)
        out[f"streamingllm {1 - ratio:.0%}"] = StreamingLLMPress(compression_ratio=ratio)
        out[f"knorm {1 - ratio:.0%}"] = KnormPress(compression_ratio=ratio)
        out[f"expected-attention {1 - ratio:.0%}"] = ExpectedAttentionPress(compression_ratio=ratio)
        out[f"adakv-snapkv {1 - ratio:.0%}"] = AdaKVPress(SnapKVPress(compression_ratio=ratio))
    for threshold in dms_thresholds:  # Knorm scores are minus key norms: keys with a norm above -t are masked
        out[f"dms-knorm t={threshold}"] = DMSPress(KnormPress(), threshold=threshold, sliding_window_size=32)
    return out


MASKS_ONLY = ("adakv", "dms")  # kvpress fakes these by masking keys: no memory is freed


def prompts(tok, count: int):
    from refreekv.commands.tasks import ANSWER_FORMAT, SPLITS, _insert, filler

    sp = SPLITS["test"]
    rng = np.random.default_rng(5)
    out = []
    offset = 120_000
    for length in (1024, 2048):
        for depth in (0.1, 0.5, 0.9):
            for p in range(2):
                sentence, question = sp.needles[p]
                number = str(rng.integers(1000, 9999))
                body = filler(tok, "test", length - 80, offset)
                offset += 2311
                out.append(("needle", length, _insert(body, depth, sentence.format(number=number)),
                            question + ANSWER_FORMAT, number))
    for i in range(2):
        names = list(rng.choice(sp.names, 4, replace=False))
        codes = [str(rng.integers(1000, 9999)) for _ in names]
        body = filler(tok, "test", 2000, offset)
        offset += 2311
        for name, code in zip(names, codes):
            body = _insert(body, float(rng.random()), f"The special code for {name} is {code}.")
        out.append(("multikey", 2048, body, f"What is the special code for {names[i]}?" + ANSWER_FORMAT, codes[i]))
    if count >= len(out):
        return out
    # evenly spread over the grid (lengths, depths, phrasings, multi-key), not its first rows
    return [out[int(i)] for i in np.linspace(0, len(out) - 1, count).round()]


@torch.no_grad()
def calibrate_dms(model, tok, keep: list[float]) -> list[float]:
    """DMS thresholds over Knorm scores (minus key norms) that keep about ``keep`` of the keys, read off
    the key norms of one 2k-token prompt of the dev split (never the test prompts scored here)."""
    from transformers import DynamicCache

    from refreekv.commands.tasks import filler

    ids = tok(filler(tok, "dev", 2048, 7), return_tensors="pt")["input_ids"]
    cache = DynamicCache()
    model(input_ids=ids, past_key_values=cache)
    norms = torch.cat([layer.keys.norm(dim=-1).flatten() for layer in cache.layers]).double()
    return [-float(torch.quantile(norms, k)) for k in keep]


def _peak_reset():
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(press):
    """Time a kvpress press's forward hooks (its compression work), layer calls counted."""
    press._hook_s, press._hook_n = 0.0, 0
    inner = press.forward_hook

    def hook(module, input, kwargs, output):
        t = time.perf_counter()
        out = inner(module, input, kwargs, output)
        press._hook_s += time.perf_counter() - t
        press._hook_n += 1
        return out

    press.forward_hook = hook
    return press


@torch.no_grad()
def main(argv=None) -> None:
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import DynamicCache, pipeline

    from refreekv.commands.models import load_torch
    from refreekv.commands.output import markdown_table, write

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--prompts", type=int, default=14)
    ap.add_argument("--only", default="", help="comma-separated name prefixes of the presses to run (default: all)")
    ap.add_argument("--dms-thresholds", type=lambda s: [float(x) for x in s.split(",") if x], default=[-2.0, -3.0],
                    help="DMSPress(KnormPress()) thresholds (kvpress 0.5.5 has no default)")
    ap.add_argument("--dms-keep", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                    help="instead of --dms-thresholds: thresholds that keep these shares of the keys, "
                         "calibrated on a dev-split prompt (e.g. 0.7,0.5)")
    a = ap.parse_args(argv)
    if any(not 0 < k < 1 for k in a.dms_keep):
        ap.error(f"--dms-keep: received {a.dms_keep}; expected shares in (0, 1)")
    model, tok = load_torch()
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    thresholds = calibrate_dms(model, tok, a.dms_keep) if a.dms_keep else a.dms_thresholds
    if a.dms_keep:
        print("DMS thresholds", dict(zip(a.dms_keep, thresholds)), flush=True)
    table = presses([round(t, 3) for t in thresholds])
    if a.only:
        table = {k: v for k, v in table.items() if k.startswith(tuple(a.only.split(",")))}
        if not table:
            ap.error(f"--only {a.only!r} names no press")
    rows = {name: {"inside": [], "after": []} for name in table}
    items = prompts(tok, a.prompts)
    for i, (kind, length, body, question, expect) in enumerate(items):
        for setting in ("inside", "after"):
            context = body + "\n\n" + question if setting == "inside" else body
            for name, press in table.items():
                if press is not None:
                    timed(press)
                cache = DynamicCache()
                _peak_reset()
                t = time.perf_counter()
                answer = pipe(context, question=question, press=press, cache=cache, max_new_tokens=24)["answer"]
                seconds = time.perf_counter() - t
                n = pipe.preprocess(context, [question], "", 10**6)["context_ids"].shape[1]
                if press is None:
                    budget = 1.0
                elif name.startswith("refreekv"):
                    budget = press.report.budget[0]
                elif name.startswith(MASKS_ONLY):  # keys masked, not freed: the budget is the unmasked share
                    budget = 1.0 - float(press.compression_ratio)
                else:  # the context's kept share per layer (answers are trimmed away by the pipeline)
                    budget = float(np.mean([layer.keys.shape[-2] / n for layer in cache.layers]))
                rows[name][setting].append({
                    "kind": kind, "length": length, "ok": expect in answer, "answer": answer, "budget": budget,
                    "seconds": seconds, "peak_mb": _peak_mb(), "n": n,
                    "hook_ms_per_layer": 1e3 * press._hook_s / max(1, press._hook_n) if press is not None else 0.0})
                del cache
            print(f"{i + 1}/{len(items)} {kind} {length} done", flush=True)
    summary = {}
    for name, by in rows.items():
        summary[name] = {s: {"accuracy": float(np.mean([r["ok"] for r in rs])),
                             "budget": float(np.mean([r["budget"] for r in rs])),
                             "hook_ms_per_layer": float(np.mean([r["hook_ms_per_layer"] for r in rs])),
                             "peak_mb": float(np.max([r["peak_mb"] for r in rs]))} for s, rs in by.items()}
        summary[name]["frees_memory"] = not name.startswith(MASKS_ONLY)
    headers = ["press", "acc (question inside)", "budget inside", "acc (question after)", "budget after",
               "frees memory", "press ms / layer", "peak RSS MB"]
    md_rows = [[name, f"{s['inside']['accuracy']:.2f}", f"{s['inside']['budget']:.0%}", f"{s['after']['accuracy']:.2f}",
                f"{s['after']['budget']:.0%}", "yes" if s["frees_memory"] else "no (masks keys)",
                f"{s['after']['hook_ms_per_layer']:.2f}", f"{max(s['inside']['peak_mb'], s['after']['peak_mb']):.0f}"]
               for name, s in summary.items()]
    md = (f"# ReFreeKV in kvpress's pipeline ({len(items)} prompts x 2 settings, SmolLM2-135M, torch CPU, "
          f"kvpress 0.5.5, transformers {__import__('transformers').__version__})\n\n" + markdown_table(headers, md_rows))
    write(a.out, "kvpress_compare", {"summary": summary, "rows": rows}, md)
    _plot(summary, f"{a.out}/kvpress_compare.png")
    print(md)


def _plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, setting in zip(axes, ("inside", "after")):
        for name, s in summary.items():
            marker = "*" if name == "full" else "o" if name.startswith("refreekv") else "s"
            ax.scatter(s[setting]["budget"], s[setting]["accuracy"], marker=marker, s=50)
            ax.annotate(name, (s[setting]["budget"], s[setting]["accuracy"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel="budget (fraction of the context kept)", ylabel="accuracy",
               title=f"kvpress pipeline, question {setting} the compressed context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
