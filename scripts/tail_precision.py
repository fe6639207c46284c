"""Study (issue 10, round five): keep what the rule evicts at low precision instead of dropping it.

ReFreeKV's rule decides, per layer and prompt, which positions are kept (the sinks and the newest run);
every other position is dropped. Here the dropped positions are kept instead, quantized to 8 or 4 bits
(affine, one scale and one bias per group of 64 values along the head dimension: the scheme of
mlx-lm's ``mx.quantize`` and transformers' quantized caches), and the kept positions stay at full
precision. The question: does that keep the free answers the eviction changes, at fewer bytes?

What is simulated and what is measured: the quantized tail is stored quantize-dequantized (the exact
values a packed store would hand to attention), so answers, KL and top-1 are measured; its bytes are
*computed* for packed storage (codes at ``bits`` per value, scale and bias in float32 per group) and
the kept positions' bytes are the measured float32 K/V. No engine stores a quantized tail yet.

Rows: the full cache; eviction (the library's default and the paper, through ``ReFreeKVCache``);
the same two boundaries with the tail at 8 and 4 bits; a fixed boundary with a 4-bit tail (StreamingLLM
at 50 % and 30 %: the sinks and the newest half or third at full precision, a KIVI-like residual);
mixed precision (the kept positions at 8 bits, the tail at 4: does the threshold-free boundary say which
positions a quantized cache can hold at 4 bits?); and every position quantized (uniform 8 and 4 bits,
the sinks too). Each prompt is prefilled once;
every row is built from that prefill and all rows decode together (``runner.score``).

    python scripts/tail_precision.py --split dev --max-length 4096 --out docs/measured
    python scripts/tail_precision.py --split demo          # refreekv demo's five prompts

Results are cached per (prompt, row) in ``results/tail_precision_cache.jsonl`` (``--cache``), so a re-run
computes only what is missing; a progress bar shows the prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refreekv import ReFreeKVConfig  # noqa: E402
from refreekv.commands.output import markdown_table, write  # noqa: E402
from refreekv.commands.runner import Layers, _fork, fixed, prompt_ids, score  # noqa: E402
from refreekv.commands.tasks import Prompt, build  # noqa: E402

GROUP = 64
#: row -> (what decides the kept set, tail bits, kept bits). "evict" rows drop the tail (tail bits None);
#: kept bits None keeps the kept positions as they are (float32); "uniform" rows quantize every position.
ROWS = {
    "default, evict": ("default", None, None),
    "default, tail 8-bit": ("default", 8, None),
    "default, tail 4-bit": ("default", 4, None),
    "paper, evict": ("paper", None, None),
    "paper, tail 8-bit": ("paper", 8, None),
    "paper, tail 4-bit": ("paper", 4, None),
    "streamingllm 50%, tail 4-bit": ("streamingllm 50%", 4, None),
    "streamingllm 30%, tail 4-bit": ("streamingllm 30%", 4, None),
    "default, kept 8-bit, tail 4-bit": ("default", 4, 8),
    "paper, kept 8-bit, tail 4-bit": ("paper", 4, 8),
    "streamingllm 50%, kept 8-bit, tail 4-bit": ("streamingllm 50%", 4, 8),
    "uniform 8-bit": ("uniform", 8, None),
    "uniform 4-bit": ("uniform", 4, None),
}
BOUNDARIES = {"default": ReFreeKVConfig.evicting(), "paper": ReFreeKVConfig.paper(),
              "streamingllm 50%": fixed("streamingllm", 0.5), "streamingllm 30%": fixed("streamingllm", 0.3)}


def fake_quantize(x: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """Quantize-dequantize ``x`` (..., d): per group of ``group`` values, codes
    ``round((x - lo) / s)`` in [0, 2^bits - 1] with ``s = (hi - lo) / (2^bits - 1)``, back as ``code * s + lo``."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / (2 ** bits - 1)
    q = torch.where(s > 0, ((g - lo) / torch.where(s > 0, s, 1)).round().clamp(0, 2 ** bits - 1), 0)
    return (q * s + lo).reshape(shape)


def packed_bytes(tokens: int, heads: int, d: int, bits: int) -> int:
    """Bytes of K and V for ``tokens`` positions stored packed: codes, then a float32 scale and bias per group."""
    return 2 * tokens * heads * (d * bits // 8 + (d // GROUP) * 2 * 4)


def tail_layers(pre, kept: list[int], bits: int, sinks: int, kept_bits: int | None = None) -> tuple[Layers, int]:
    """Every position of the prefill: layer i's sinks and newest ``kept[i] - sinks`` as they are (or
    quantize-dequantized at ``kept_bits``), the rest quantize-dequantized at ``bits`` (``kept[i] = 0``: every
    position). Returns the layers and their bytes (packed where quantized)."""
    layers, total = [], 0
    for layer, k in zip(pre.cache.layers, kept):
        B, Hkv, n, d = layer.keys.shape
        lo, hi = (0, n) if k == 0 else (min(sinks, n), n - max(0, k - sinks))
        K, V = layer.keys.clone(), layer.values.clone()
        if hi > lo:
            K[:, :, lo:hi] = fake_quantize(K[:, :, lo:hi], bits)
            V[:, :, lo:hi] = fake_quantize(V[:, :, lo:hi], bits)
        for a, b in ((0, lo), (hi, n)):
            if kept_bits is not None and b > a:
                K[:, :, a:b] = fake_quantize(K[:, :, a:b], kept_bits)
                V[:, :, a:b] = fake_quantize(V[:, :, a:b], kept_bits)
        new = type(layer).__new__(type(layer))
        new.__dict__.update(layer.__dict__)
        new.keys, new.values = K, V
        layers.append(new)
        full_tokens = n - (hi - lo)
        total += packed_bytes(hi - lo, Hkv, d, bits) + (
            2 * full_tokens * Hkv * d * K.element_size() if kept_bits is None else packed_bytes(full_tokens, Hkv, d, kept_bits))
    return Layers(layers), total


@torch.no_grad()
def run_prompt(model, tok, prompt: Prompt, rows: list[str]) -> dict[str, dict]:
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill

    ids, targets = prompt_ids(tok, prompt)
    n = ids.shape[1]
    t = time.perf_counter()
    pre = capture_prefill(model, ids, configs=list(BOUNDARIES.values()))
    prefill_s = time.perf_counter() - t
    full_bytes = sum(x.numel() * x.element_size() for layer in pre.cache.layers for x in (layer.keys, layer.values))
    kept = {}
    names, caches, records = ["__full__"], [_fork(pre.cache)], {"__full__": {"seconds": 0.0}}
    for name in rows:
        where, bits, kept_bits = ROWS[name]
        if where == "uniform":
            cache, nbytes = tail_layers(pre, [0] * len(pre.cache.layers), bits, 0)
            budget = 0.0
        else:
            cfg = BOUNDARIES[where]
            if where not in kept:
                rep = ReFreeKVCache.from_prefill(pre, cfg).report
                kept[where] = ([r.kept[0] for r in rep.layers], rep.budget[0], rep.bytes_after)
            per_layer, budget, evicted_bytes = kept[where]
            if bits is None:
                cache, nbytes = ReFreeKVCache.from_prefill(pre, cfg), evicted_bytes
            else:
                cache, nbytes = tail_layers(pre, per_layer, bits, cfg.sinks, kept_bits)
        names.append(name)
        caches.append(cache)
        records[name] = {"row": name, "prompt": prompt.id, "kind": prompt.kind, "length": prompt.length, "n": n,
                         "full_precision_share": budget, "kv_bytes": nbytes, "kv_bytes_full": full_bytes,
                         "prefill_s": prefill_s, "seconds": 0.0}
    score(model, tok, prompt, pre, n, targets, names, caches, records)
    return {name: records[name] for name in rows}


def demo_prompts(tok) -> list[Prompt]:
    from refreekv.commands.demo import demo_prompts as demo

    kinds = {"": "open"}
    return [Prompt(f"demo/{i}", kinds.get(expect, "needle"), text, expect, 0) for i, (_, text, expect) in enumerate(demo(tok))]


def summarise(records: list[dict]) -> dict:
    by = defaultdict(list)
    for r in records:
        by[r["kind"]].append(r)
    out = {"prompts": len(records), "bytes": sum(r["kv_bytes"] for r in records) / sum(r["kv_bytes_full"] for r in records),
           "full_precision_share": float(np.mean([r["full_precision_share"] for r in records]))}
    for kind in ("needle", "multikey"):
        if by[kind]:
            out[kind] = (sum(r["ok"] for r in by[kind]), sum(r["full_ok"] for r in by[kind]), len(by[kind]),
                         sum(r["full_ok"] and not r["ok"] for r in by[kind]))
    if by["continuation"]:
        out["cont_kl"] = float(np.mean([r["kl"] for r in by["continuation"]]))
        out["cont_kl_max"] = float(np.max([r["kl"] for r in by["continuation"]]))
        out["cont_top1"] = float(np.mean([r["top1"] for r in by["continuation"]]))
    if by["open"]:
        out["open_same"] = (sum(r["same"] for r in by["open"]), len(by["open"]))
        out["open_kl"] = float(np.mean([r["kl"] for r in by["open"]]))
    return out


def table(split: str, rows: list[str], summary: dict[str, dict]) -> str:
    headers = ["row", "KV bytes vs full (packed tail)", "full-precision share", "needles (lost vs full)",
               "multi-key (lost)", "cont. KL (max)", "top-1", "open answers = full", "open KL"]
    out = []
    for name in rows:
        s = summary[name]

        def hits(key):
            return f"{s[key][0]}/{s[key][2]} ({s[key][3]})" if key in s else "-"

        out.append([name, f"{s['bytes']:.1%}", f"{s['full_precision_share']:.1%}", hits("needle"), hits("multikey"),
                    f"{s['cont_kl']:.4f} ({s['cont_kl_max']:.4f})" if "cont_kl" in s else "-",
                    f"{s['cont_top1']:.3f}" if "cont_top1" in s else "-",
                    f"{s['open_same'][0]}/{s['open_same'][1]}" if "open_same" in s else "-",
                    f"{s['open_kl']:.4f}" if "open_kl" in s else "-"])
    return f"# Tail precision study, split {split}\n\n{markdown_table(headers, out)}\n"


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.progress import track

    from refreekv.commands.models import load_torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="dev", choices=["dev", "test", "holdout", "demo"])
    ap.add_argument("--max-length", type=int, default=4096, help="only prompts up to this many tokens")
    ap.add_argument("--min-length", type=int, default=0)
    ap.add_argument("--kinds", default="needle,multikey,continuation,open")
    ap.add_argument("--rows", default=";".join(ROWS), help="rows of ROWS, separated by semicolons")
    ap.add_argument("--out", default="results")
    ap.add_argument("--cache", default="results/tail_precision_cache.jsonl",
                    help="results cache (JSON lines, one per prompt and row)")
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(";")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; expected among {list(ROWS)}")
    torch.set_num_threads(1)
    console = Console()
    model, tok = load_torch()
    prompts = demo_prompts(tok) if args.split == "demo" else \
        [p for p in build(tok, args.split) if args.min_length <= p.length <= args.max_length
         and p.kind in args.kinds.split(",")]
    out = Path(args.out)
    cache_file = Path(args.cache)
    done = {}
    if cache_file.exists():
        for line in cache_file.read_text().splitlines():
            try:
                r = json.loads(line)
                done[(r["prompt"], r["row"], r["text_digest"], r["fingerprint"])] = r
            except (json.JSONDecodeError, KeyError):
                continue
    import hashlib

    # What the rows depend on besides the prompt: the boundaries' configurations, the group and the rows' bits.
    fingerprint = hashlib.sha256(repr((BOUNDARIES, GROUP, ROWS)).encode()).hexdigest()[:16]
    records = defaultdict(list)
    t0 = time.perf_counter()
    for p in track(prompts, description=f"tail precision, {args.split}", console=console):
        digest = hashlib.sha256((p.text + p.target).encode()).hexdigest()[:16]
        todo = [r for r in rows if (p.id, r, digest, fingerprint) not in done]
        if todo:
            for name, rec in run_prompt(model, tok, p, todo).items():
                rec["text_digest"], rec["fingerprint"] = digest, fingerprint
                done[(p.id, name, digest, fingerprint)] = rec
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                with cache_file.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
        for r in rows:
            records[r].append(done[(p.id, r, digest, fingerprint)])
    summary = {r: summarise(records[r]) for r in rows}
    suffix = f"_{args.split}" + (f"_upto{args.max_length}" if args.max_length < 7500 else "") + \
        (f"_from{args.min_length}" if args.min_length else "")
    md = table(args.split, rows, summary) + f"\n{len(prompts)} prompts, {time.perf_counter() - t0:.0f} s.\n"
    write(out, f"tail_precision{suffix}", {"summary": summary, "records": records}, md)
    console.print(md)


if __name__ == "__main__":
    main()
