"""How many more concurrent sequences a fixed paged KV pool holds with the budgets `refreekv eval`
measured (docs/serving.md). Block rounding included.

    python scripts/serving_capacity.py results/eval_main_test_full_records.json [--block 16] [--gen 256]

For each method and prompt, from the per-layer kept counts the eval recorded:
- full cache: every layer needs ceil((n + g) / b) blocks;
- compaction (per-layer block tables): layer l needs ceil((k_l + g) / b) blocks;
- free-in-place (one block table for all layers): every layer needs the blocks of the most
  demanding layer, sinks (1 block) + ceil((max_l r_l + g) / b), with r_l = k_l - sinks.
Capacity gain = blocks per sequence with the full cache / with the method (the pool cancels out),
averaged over prompts (sequences of different lengths share the pool in proportion to their blocks).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def blocks(records: list[dict], b: int, g: int, sinks: int = 4) -> tuple[float, float, float]:
    full = compact = in_place = 0
    for r in records:
        n, kept = r["n"], r["kept_per_layer"]
        L = len(kept)
        full += L * math.ceil((n + g) / b)
        compact += sum(math.ceil((k + g) / b) for k in kept)
        recent = max(k - min(sinks, k) for k in kept)
        in_place += L * (1 + math.ceil((recent + g) / b)) if recent < n - sinks else L * math.ceil((n + g) / b)
    return full, compact, in_place


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("records", type=Path, help="an eval_*_records.json written by refreekv eval")
    p.add_argument("--block", type=int, default=16, help="tokens per block (vLLM's default 16)")
    p.add_argument("--gen", type=int, default=256, help="tokens each sequence generates")
    a = p.parse_args(argv)
    data = json.loads(a.records.read_text())
    print(f"| method | mean budget | blocks vs full (compaction) | capacity gain (compaction) | "
          f"capacity gain (free in place) |\n|---|---:|---:|---:|---:|")
    for method, recs in data.items():
        recs = [r for r in recs if r.get("kept_per_layer")]
        if not recs:
            continue
        full, compact, in_place = blocks(recs, a.block, a.gen)
        budget = sum(r["budget"] for r in recs) / len(recs)
        print(f"| {method} | {budget:.1%} | {compact / full:.1%} | {full / compact:.2f}x | {full / in_place:.2f}x |")


if __name__ == "__main__":
    main()
