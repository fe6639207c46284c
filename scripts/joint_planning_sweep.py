"""How many layers to plan together on a CPU: plan_layers over 32 Llama3-8B-shaped layers
(H 32, Hkv 8, d 128, torch float32) in groups of 1 to 32 layers, median of 3, with the default
configuration's query rows (``--paper``: one row, the paper's).

    python scripts/joint_planning_sweep.py [--paper] [n ...]      # default: 4096 32768

The transformers hooks' CPU_JOINT_BYTES comes from this table (docs/results.md).
"""

import sys
import time

import numpy as np
import torch

import refreekv


def main(lengths: list[int], cfg: refreekv.ReFreeKVConfig) -> None:
    rng = np.random.default_rng(0)
    print("| n | layers per group | stacked scores MiB | 32 layers ms |\n|---:|---:|---:|---:|")
    for n in lengths:
        rows = cfg.rows_needed(n)
        q = torch.from_numpy(rng.normal(size=(1, 32, rows, 128)).astype(np.float32))
        k = torch.from_numpy(rng.normal(size=(1, 8, n, 128)).astype(np.float32))
        for g in (1, 2, 4, 8, 16, 32):
            def run():
                for _ in range(32 // g):
                    refreekv.plan_layers([q] * g, [k] * g, cfg)
            run()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            print(f"| {n} | {g} | {g * 32 * rows * n * 4 / 2**20:.1f} | {np.median(times) * 1e3:.1f} |")


if __name__ == "__main__":
    args = sys.argv[1:]
    paper = "--paper" in args
    main([int(x) for x in args if x != "--paper"] or [4096, 32768],
         refreekv.ReFreeKVConfig.paper() if paper else refreekv.ReFreeKVConfig())
