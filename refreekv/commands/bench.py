"""`refreekv bench`: speed and memory, measured, with the targets of issue 6 checked.

Real model (SmolLM2-135M, float32): per prompt length, prefill time with a plain cache and with
ReFreeKV, the planning step (plan_layer) and the eviction step (evict) timed alone on the
captured queries and keys, a plain copy of the kept K/V of the same size, decode tokens/s with
the full vs the compressed cache, KV bytes held, and the peak RSS of the process (reset before
each measurement through /proc/self/clear_refs). Synthetic: the planning step alone on
Llama3-8B shapes (32 heads, 8 KV heads, d 128), every available backend, up to 32k tokens: one
layer, and 32 layers planned together by plan_layers.
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import numpy as np
import torch

import refreekv
from refreekv import ReFreeKVConfig

from .output import markdown_table, rich_table, write


def _sync(device: str = "cpu") -> None:
    """Wait for queued GPU work, so that a wall-clock interval covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _median_s(fn, repeat: int, device: str = "cpu") -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


#: aten operators that only make views or read metadata: no kernel runs for them.
VIEW_OPS = frozenset(f"aten::{x}" for x in (
    "view", "reshape", "_reshape_alias", "expand", "expand_as", "transpose", "t", "as_strided", "slice", "select",
    "unsqueeze", "squeeze", "permute", "alias", "detach", "detach_", "lift_fresh", "empty", "empty_like",
    "empty_strided", "resolve_conj", "resolve_neg", "to", "_unsafe_view", "result_type", "item",
    "_local_scalar_dense", "contiguous", "broadcast_to", "split", "chunk", "unbind", "narrow", "flatten",
    "view_as", "numpy_T", "is_nonzero", "set_", "size", "stride", "dim"))


def count_ops(fn) -> dict:
    """Operators one call of ``fn`` dispatches, from torch.profiler on the CPU: ``aten`` counts the
    top-level aten operators (those not called by another one), ``compute`` those of them that run a
    kernel (not a view or metadata read; on a GPU each is a kernel launch)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return {"aten": len(top), "compute": sum(e.name not in VIEW_OPS for e in top)}


def bench_operators(config: ReFreeKVConfig, n: int = 2048) -> list[dict]:
    """Operator counts of ``compress_layers`` on SmolLM2 shapes (H 9, Hkv 3, d 64, float32, CPU)
    for 1 and 28 layers: what planning costs in kernel launches on a GPU."""
    g = torch.Generator().manual_seed(0)
    rows = config.rows_needed(n)
    out = []
    for L in (1, 28):
        qs = [torch.randn(1, 9, rows, 64, generator=g) for _ in range(L)]
        ks = [torch.randn(1, 3, n, 64, generator=g) for _ in range(L)]
        vs = [torch.randn(1, 3, n, 64, generator=g) for _ in range(L)]
        call = lambda: refreekv.compress_layers(qs, ks, vs, config, layers=list(range(2, 2 + L)))  # noqa: E731
        call()
        out.append({"layers": L, "n": n, **count_ops(call)})
    return out


def _reset_peak(device: str = "cpu") -> None:
    """Start a new peak: CUDA's allocator peak on a GPU, else the process's peak RSS."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb(device: str = "cpu") -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _expected_bytes(report, layers, config: ReFreeKVConfig) -> float:
    """The K/V bytes a plan should leave, as the reference counts them: each layer's kept share of its
    full bytes, plus, with ``tail_bits``, its tail (``reference.tail_bytes``, float32 scales). One sample."""
    from refreekv import reference as ref

    total = 0.0
    for r, layer in zip(report.layers, layers):
        n, kept = r.prompt_lengths[0], r.kept[0]
        total += r.bytes_before * kept / n
        if config.tail_bits is not None and r.compressed:
            _, hkv, _, d = layer.keys.shape
            total += ref.tail_bytes(1, hkv, n - kept, d, config.tail_bits, 4)
    return total


@torch.no_grad()
def bench_model(lengths: list[int], config: ReFreeKVConfig, decode_tokens: int, repeat: int, progress,
                device: str = "cpu", dtype: str = "float32") -> list[dict]:
    from transformers import DynamicCache

    from refreekv.adapters.transformers import ReFreeKVCache, cache_kwarg, capture_prefill, refreekv_hooks

    from .models import load_torch
    from .prompts import haystack

    model, tok = load_torch(dtype, device=device)
    key = cache_kwarg(model)
    median = lambda fn: _median_s(fn, repeat, device)  # noqa: E731
    rows = []
    for n in lengths:
        ids = tok([" ".join(haystack(n))], return_tensors="pt")["input_ids"][:, :n].to(device)

        def prefill(cfg):
            cache = DynamicCache(config=model.config) if cfg is None else ReFreeKVCache(model, cfg)
            with refreekv_hooks(model):
                logits = model(input_ids=ids, **{key: cache}).logits[:, -1:]
            return cache, logits

        _reset_peak(device)
        t_full = median(lambda: prefill(None))
        peak_full = _peak_mb(device)
        _reset_peak(device)
        t_ours = median(lambda: prefill(config))
        peak_ours = _peak_mb(device)
        full_cache, logits = prefill(None)
        ops_full, ops_ours = count_ops(lambda: prefill(None)), count_ops(lambda: prefill(config))
        # The hooks' own time (capture, queries, plan, evict) inside real prefills, median of
        # `repeat`. On a GPU, the one read of the cuts waits for prefill work still queued, so
        # there this time also holds prefill work (the overhead below is then a difference).
        hook_times = []
        for _ in range(repeat):
            cache, _ = prefill(config)
            hook_times.append(cache.report.seconds)
        hook_s = float(np.median(hook_times))

        # The two steps alone, on the keys and queries the model produced, summed over layers.
        plan_s = evict_s = copy_s = 0.0
        pre = capture_prefill(model, ids, configs=config)
        for cap in pre.captured:
            m = cap.module
            if config.is_retained(m.layer_idx):
                continue
            q = cap.queries(config.rows_needed(n))
            K, V = full_cache.layers[m.layer_idx].keys, full_cache.layers[m.layer_idx].values
            plan = refreekv.plan_layer(q, K, config, scale=m.scaling)
            J = int(plan.cut.max())
            plan_s += median(lambda: refreekv.plan_layer(q, K, config, scale=m.scaling))
            evict_s += median(lambda: refreekv.evict_plan(K, V, plan))  # what compress_layer runs
            copy_s += median(lambda: (K[:, :, n - J:].clone(), V[:, :, n - J:].clone()))
        del pre

        def decode(c):
            nxt = logits.argmax(-1)
            mask = torch.ones(1, n, dtype=torch.long, device=device)
            _sync(device)
            t = time.perf_counter()
            with refreekv_hooks(model):
                for _ in range(decode_tokens):
                    mask = torch.cat([mask, mask[:, :1]], dim=1)
                    nxt = model(input_ids=nxt, attention_mask=mask, **{key: c}).logits[:, -1:].argmax(-1)
            _sync(device)
            return decode_tokens / (time.perf_counter() - t)

        tps_full = float(np.median([decode(copy.deepcopy(full_cache)) for _ in range(repeat)]))
        tps_ours = float(np.median([decode(copy.deepcopy(cache)) for _ in range(repeat)]))
        rep = cache.report
        # CPU: the hooks run in line, so their own time is the overhead (and far less noisy than
        # a difference of two prefills). GPU: the hooks wait for queued prefill work, so the
        # overhead is the difference of the two prefills' wall times.
        over_s = (t_ours - t_full) if device.startswith("cuda") else hook_s
        rows.append({
            "n": n, "budget": rep.budget[0], "prefill_full_s": t_full, "prefill_refreekv_s": t_ours,
            "hook_ms": hook_s * 1e3, "overhead_ms": over_s * 1e3, "overhead_pct": 100 * over_s / t_full,
            "plan_ms": plan_s * 1e3, "evict_ms": evict_s * 1e3, "copy_ms": copy_s * 1e3,
            "evict_vs_copy": evict_s / copy_s if copy_s else float("nan"),
            "decode_tok_s_full": tps_full, "decode_tok_s_refreekv": tps_ours,
            "kv_bytes_full": rep.bytes_before, "kv_bytes_refreekv": rep.bytes_after,
            "bytes_ratio": rep.bytes_after / rep.bytes_before, "bytes_expected_ratio": _expected_bytes(
                rep, cache.layers, config) / rep.bytes_before,
            "peak_mb_full": peak_full, "peak_mb_refreekv": peak_ours,
            "hook_compute_ops": ops_ours["compute"] - ops_full["compute"], "hook_aten_ops": ops_ours["aten"] - ops_full["aten"],
        })
        progress()
    return rows


def bench_mlx(lengths: list[int], config: ReFreeKVConfig, progress) -> list[dict]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache as plain

    from refreekv.adapters.mlx_lm import budget_report, make_prompt_cache

    from .models import load_mlx
    from .prompts import haystack

    model, tok = load_mlx()
    rows = []
    for n in lengths:
        ids = tok.encode(" ".join(haystack(n)))[:n]

        def prefill(cache):
            model(mx.array(ids[:-1])[None], cache=cache)
            out = model(mx.array(ids[-1:])[None], cache=cache)
            mx.eval(out, [c.state for c in cache])
            return cache

        t = time.perf_counter()
        prefill(plain(model))
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        cache = prefill(make_prompt_cache(model, config))
        t_ours = time.perf_counter() - t
        rep = budget_report(cache)
        rows.append({"n": n, "budget": rep.budget[0], "prefill_full_s": t_full, "prefill_refreekv_s": t_ours,
                     "overhead_ms": rep.seconds * 1e3, "overhead_pct": 100 * rep.seconds / t_full,
                     "kv_bytes_full": rep.bytes_before, "kv_bytes_refreekv": rep.bytes_after})
        progress()
    return rows


def bench_planning(lengths: list[int], progress, config: ReFreeKVConfig | None = None) -> list[dict]:
    """plan_layer alone on Llama3-8B shapes, per layer and for 32 layers, on every backend here,
    with the benchmarked configuration's query rows."""
    config = ReFreeKVConfig() if config is None else config
    backends = ["numpy", "torch-cpu"]
    try:
        import mlx.core  # noqa: F401

        backends.append("mlx-cpu")
    except ImportError:
        pass
    if torch.cuda.is_available():
        backends.append("torch-cuda")
    rows = []
    rng = np.random.default_rng(0)
    for n in lengths:
        q_np = rng.normal(size=(1, 32, config.rows_needed(n), 128)).astype(np.float32)
        k_np = rng.normal(size=(1, 8, n, 128)).astype(np.float32)
        for name in backends:
            if name == "numpy":
                q, k = q_np, k_np
                sync = lambda: None  # noqa: E731
            elif name.startswith("torch"):
                dev = "cuda" if name.endswith("cuda") else "cpu"
                q, k = torch.from_numpy(q_np).to(dev), torch.from_numpy(k_np).to(dev)
                sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            else:
                import mlx.core as mx

                q, k = mx.array(q_np), mx.array(k_np)
                sync = lambda: None  # noqa: E731  (plan_layer evaluates when it reads the cut)
            s = _median_s(lambda: (refreekv.plan_layer(q, k, config), sync()), 5)
            # The same 32 layers planned together, as the transformers hooks do after prefill.
            joint = _median_s(lambda: (refreekv.plan_layers([q] * 32, [k] * 32, config), sync()), 3)
            rows.append({"backend": name, "n": n, "plan_ms_per_layer": s * 1e3, "plan_ms_32_layers": 32 * s * 1e3,
                         "plan_layers_ms_32_layers": joint * 1e3})
        progress()
    return rows


def run_bench(lengths: list[int], synthetic: list[int], mlx_lengths: list[int], decode_tokens: int, repeat: int,
              out_dir: str, as_json: bool = False, device: str = "cpu", dtype: str = "float32",
              config: ReFreeKVConfig | None = None) -> dict:
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=as_json)
    config = ReFreeKVConfig() if config is None else config
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(device)}"
    where = f"torch {device}, {dtype}"
    peak = "peak CUDA MB" if device.startswith("cuda") else "peak RSS MB"
    with Progress(console=console) as p:
        bar = p.add_task("bench", total=len(lengths) + len(synthetic) + len(mlx_lengths))
        step = lambda: p.advance(bar)  # noqa: E731
        model_rows = bench_model(lengths, config, decode_tokens, repeat, step, device, dtype) if lengths else []
        mlx_rows = bench_mlx(mlx_lengths, config, step) if mlx_lengths else []
        plan_rows = bench_planning(synthetic, step, config) if synthetic else []
        op_rows = bench_operators(config)
    targets = []
    for r in model_rows:
        targets.append({
            "n": r["n"],
            "overhead < 1% of prefill (n >= 2k)": None if r["n"] < 2048 else r["overhead_pct"] < 1.0,
            "evict within 2x of a plain copy": r["evict_vs_copy"] <= 2.0,
            "KV bytes = kept (+ tail) as the reference counts them": abs(r["bytes_ratio"] - r["bytes_expected_ratio"]) < 1e-9,
            "decode not slower than full": r["decode_tok_s_refreekv"] >= r["decode_tok_s_full"],
        })
    out = {"machine": machine, "torch": torch.__version__, "device": device, "dtype": dtype,
           "peak_memory": "CUDA max_memory_allocated" if device.startswith("cuda") else "process peak RSS (VmHWM)",
           "model": model_rows, "mlx": mlx_rows,
           "planning_synthetic": plan_rows, "operators": op_rows, "targets": targets,
           "config": config.to_dict()}
    md = [f"# refreekv bench ({machine}; torch {torch.__version__})", ""]
    if model_rows:
        h = ["n", "budget", "prefill full s", "prefill ReFreeKV s", "hook ms", "overhead ms", "overhead %", "plan ms",
             "evict ms", "copy ms", "evict/copy", "decode tok/s full", "decode tok/s ReFreeKV", "KV MB full",
             "KV MB ReFreeKV", f"{peak} full", f"{peak} ReFreeKV"]
        rows = [[r["n"], f"{r['budget']:.1%}", f"{r['prefill_full_s']:.3f}", f"{r['prefill_refreekv_s']:.3f}",
                 f"{r['hook_ms']:.1f}", f"{r['overhead_ms']:.1f}", f"{r['overhead_pct']:.2f}", f"{r['plan_ms']:.1f}",
                 f"{r['evict_ms']:.2f}", f"{r['copy_ms']:.2f}", f"{r['evict_vs_copy']:.2f}", f"{r['decode_tok_s_full']:.1f}",
                 f"{r['decode_tok_s_refreekv']:.1f}", f"{r['kv_bytes_full'] / 2**20:.1f}",
                 f"{r['kv_bytes_refreekv'] / 2**20:.1f}", f"{r['peak_mb_full']:.0f}", f"{r['peak_mb_refreekv']:.0f}"]
                for r in model_rows]
        overhead = ("overhead = prefill ReFreeKV - prefill full (the hooks wait for queued GPU work)"
                    if device.startswith("cuda") else "overhead = the hooks' own time inside the real prefill")
        md += [f"## SmolLM2-135M, {where}", "", f"({overhead}; {out['peak_memory']})", "", markdown_table(h, rows), ""]
        th = list(targets[0].keys())
        md += ["## Targets", "", markdown_table(th, [[("n/a" if v is None else ("met" if v is True else ("MISSED" if v is False else v)))
                                                      for v in t.values()] for t in targets]), ""]
        md += ["Operators the hooks add to a prefill (top-level aten operators, from torch.profiler):", "",
               markdown_table(["n", "hook compute ops", "hook aten ops"],
                              [[r["n"], r["hook_compute_ops"], r["hook_aten_ops"]] for r in model_rows]), ""]
        if not as_json:  # a narrow table for the terminal; every column is in bench.md
            console.print(rich_table(f"SmolLM2-135M, {where}", ["n", "budget", "overhead ms", "%", "evict/copy",
                                                                    "decode tok/s full/ours", "KV MB full/ours"],
                                     [[r["n"], f"{r['budget']:.0%}", f"{r['overhead_ms']:.1f}", f"{r['overhead_pct']:.2f}",
                                       f"{r['evict_vs_copy']:.2f}",
                                       f"{r['decode_tok_s_full']:.1f}/{r['decode_tok_s_refreekv']:.1f}",
                                       f"{r['kv_bytes_full'] / 2**20:.0f}/{r['kv_bytes_refreekv'] / 2**20:.0f}"]
                                      for r in model_rows]))
    if op_rows:
        one, many = op_rows[0], op_rows[-1]
        ops_h = ["layers", "n", "aten ops", "compute ops"]
        ops = [[r["layers"], r["n"], r["aten"], r["compute"]] for r in op_rows]
        verdict = (f"28 layers: {many['compute']} compute ops (target <= 300: {'met' if many['compute'] <= 300 else 'MISSED'}); "
                   f"{many['compute'] / one['compute']:.2f}x one layer's (target <= 3x: "
                   f"{'met' if many['compute'] <= 3 * one['compute'] else 'MISSED'})")
        md += ["## Operators of compress_layers, SmolLM2 shapes (H 9, Hkv 3, d 64), float32, CPU", "",
               markdown_table(ops_h, ops), "", verdict, ""]
        if not as_json:
            console.print(rich_table("compress_layers operators (SmolLM2 shapes, n 2048)", ops_h, ops))
            console.print(verdict)
    if mlx_rows:
        h = ["n", "budget", "prefill full s", "prefill ReFreeKV s", "overhead ms", "overhead %", "KV MB full", "KV MB ReFreeKV"]
        rows = [[r["n"], f"{r['budget']:.1%}", f"{r['prefill_full_s']:.2f}", f"{r['prefill_refreekv_s']:.2f}",
                 f"{r['overhead_ms']:.1f}", f"{r['overhead_pct']:.2f}", f"{r['kv_bytes_full'] / 2**20:.2f}",
                 f"{r['kv_bytes_refreekv'] / 2**20:.2f}"] for r in mlx_rows]
        md += ["## SmolLM2-135M, MLX CPU (Linux), float32", "", markdown_table(h, rows), ""]
        if not as_json:
            console.print(rich_table("SmolLM2-135M, MLX CPU", ["n", "budget", "overhead ms", "%", "KV MB full/ours"],
                                     [[r[0], r[1], r[4], r[5], f"{r[6]}/{r[7]}"] for r in rows]))
    if plan_rows:
        h = ["backend", "n", "plan_layer ms (1 layer)", "x 32 layers ms", "plan_layers ms (32 layers together)"]
        rows = [[r["backend"], r["n"], f"{r['plan_ms_per_layer']:.2f}", f"{r['plan_ms_32_layers']:.1f}",
                 f"{r['plan_layers_ms_32_layers']:.1f}"] for r in plan_rows]
        md += ["## Planning step alone, Llama3-8B shapes (H 32, Hkv 8, d 128), float32", "", markdown_table(h, rows), ""]
        if not as_json:
            console.print(rich_table("planning, Llama3-8B shapes", ["backend", "n", "1 layer ms", "32 one by one",
                                                                   "32 together"], rows))
    write(out_dir, "bench", out, "\n".join(md))
    return out
