"""What the exploratory scripts share (``scripts/output_error_halting.py``, ``scripts/score_selection.py``):
their command line (a split, thresholds, a limit, an output folder) and the continuations they run on."""

from __future__ import annotations

import argparse


def continuation_args(description: str, thresholds: str, argv=None) -> tuple[argparse.Namespace, list[float]]:
    """Parse ``--split --thresholds --limit --out``; bad values exit with the argument, what came and
    what was expected. Returns the namespace and the thresholds as floats (each 0 < T < 1)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--split", choices=["dev", "test"], default="dev")
    p.add_argument("--thresholds", default=thresholds, help=f"comma-separated thresholds T (default: {thresholds})")
    p.add_argument("--limit", type=int, help="only the first N continuations")
    p.add_argument("--out", default="results")
    a = p.parse_args(argv)
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


#: The columns after the method's name in every exploratory table (``summary_row``).
COLUMNS = ["budget (min-max)", "cont. KL", "top-1", "largest KL of one prompt"]


def summary_row(name: str, records: list[dict]) -> list[str]:
    """One table row over per-prompt records with ``budget``, ``kl`` and ``top1``: the name, the mean
    budget (min-max), mean KL, mean top-1 agreement and the largest KL of one prompt."""
    import numpy as np

    b = [r["budget"] for r in records]
    return [name, f"{np.mean(b):.1%} ({min(b):.0%}-{max(b):.0%})", f"{np.mean([r['kl'] for r in records]):.4f}",
            f"{np.mean([r['top1'] for r in records]):.3f}", f"{max(r['kl'] for r in records):.4f}"]
