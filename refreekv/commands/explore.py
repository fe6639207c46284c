"""What the exploratory scripts share (``scripts/output_error_halting.py``, ``scripts/score_selection.py``,
``scripts/template_rows.py``): their command line (a split, thresholds, a limit, an output folder), the
continuations they run on, a cache layer made of chosen K/V, and their table rows."""

from __future__ import annotations

import argparse


def continuation_args(description: str, thresholds: str, argv=None, *, limit_help: str = "only the first N continuations",
                      max_length: int | None = None) -> tuple[argparse.Namespace, list[float]]:
    """Parse ``--split --thresholds --limit --out`` (and ``--max-length``, default ``max_length``, when
    that is given); bad values exit with the argument, what came and what was expected. Returns the
    namespace and the thresholds as floats (each 0 < T < 1)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--split", choices=["dev", "test", "holdout"], default="dev")
    p.add_argument("--thresholds", default=thresholds, help=f"comma-separated thresholds T (default: {thresholds})")
    p.add_argument("--limit", type=int, help=limit_help)
    if max_length is not None:
        p.add_argument("--max-length", type=int, default=max_length,
                       help=f"prompts up to this many tokens (default {max_length})")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
    if max_length is not None and a.max_length < 1:
        p.error(f"--max-length: received {a.max_length}; expected an int >= 1")
    try:
        Ts = [float(x) for x in a.thresholds.split(",") if x.strip()]
    except ValueError:
        p.error(f"--thresholds: received {a.thresholds!r}; expected comma-separated numbers, e.g. {thresholds}")
    if not Ts or not all(0 < T < 1 for T in Ts):
        p.error(f"--thresholds: received {a.thresholds!r}; expected numbers T with 0 < T < 1")
    if a.limit is not None and a.limit < 1:
        p.error(f"--limit: received {a.limit}; expected an int >= 1")
    return a, Ts


def continuations(tok, split: str, limit: int | None = None) -> list:
    """The split's continuation prompts (the first ``limit``), each with its token ids (1, n) and the
    continuation's target token ids: [(prompt, ids, targets), ...]."""
    from .tasks import build

    out = []
    for prompt in [q for q in build(tok, split) if q.kind == "continuation"][:limit]:
        ids = tok([prompt.text], return_tensors="pt", add_special_tokens=False)["input_ids"]
        out.append((prompt, ids, tok(prompt.target, add_special_tokens=False)["input_ids"]))
    return out


class KeptLayer:
    """One layer of a cache-like view (``runner.Layers``) holding chosen K/V, all slots valid."""

    def __init__(self, keys, values):
        self.keys, self.values, self.slot_valid = keys, values, None


#: The columns after the method's name in every exploratory table (``summary_row``).
COLUMNS = ["budget (min-max)", "cont. KL", "top-1", "largest KL of one prompt"]


def summary_row(name: str, records: list[dict]) -> list[str]:
    """One table row over per-prompt records with ``budget``, ``kl`` and ``top1``: the name, the mean
    budget (min-max), mean KL, mean top-1 agreement and the largest KL of one prompt."""
    import numpy as np

    b = [r["budget"] for r in records]
    return [name, f"{np.mean(b):.1%} ({min(b):.0%}-{max(b):.0%})", f"{np.mean([r['kl'] for r in records]):.4f}",
            f"{np.mean([r['top1'] for r in records]):.3f}", f"{max(r['kl'] for r in records):.4f}"]
