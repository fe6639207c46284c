"""The ``refreekv`` command: demo, inspect, eval, bench (see ``refreekv <command> --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import ReFreeKVConfig
from .errors import ReFreeKVError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected comma-separated integers, e.g. 1024,2048")


def _query_rows(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"received {text!r}; expected an int (count) or a float in (0, 1)")


def _budget(text: str) -> int | float:
    return _query_rows(text)


def _config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ReFreeKV configuration (defaults: the paper's)")
    g.add_argument("--threshold", type=float, default=0.01, help="T, tolerated norm ratio (default 0.01)")
    g.add_argument("--sinks", type=int, default=4, help="attention-sink tokens always kept (default 4)")
    g.add_argument("--retained-layers", type=_ints, default=[0, 1], help="layers never compressed (default 0,1)")
    g.add_argument("--norm-scope", choices=["candidates", "all"], default="candidates")
    g.add_argument("--query-rows", type=_query_rows, default=1, help="k: int count or fraction of n (default 1)")
    g.add_argument("--ranking", choices=["position", "h2o", "snapkv"], default="position")
    g.add_argument("--window", type=int, default=8, help="recent window of the attention rankings")
    g.add_argument("--halting", choices=["threshold", "ratio", "count"], default="threshold")
    g.add_argument("--budget", type=_budget, default=None, help="fixed budget for --halting ratio|count")


def _config(a: argparse.Namespace) -> ReFreeKVConfig:
    return ReFreeKVConfig(threshold=a.threshold, sinks=a.sinks, retained_layers=tuple(a.retained_layers),
                          norm_scope=a.norm_scope, query_rows=a.query_rows, ranking=a.ranking, window=a.window,
                          halting=a.halting, budget=a.budget)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refreekv", description="Threshold-free KV-cache compression (ReFreeKV) "
                                "on the packaged SmolLM2-135M-Instruct.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="results", help="folder for JSON, Markdown and PNG results (default results/)")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")

    d = sub.add_parser("demo", parents=[common], help="full cache vs ReFreeKV on a handful of prompts")
    _config_args(d)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.add_argument("--quick", action="store_true", help="two short prompts only (a smoke test)")

    i = sub.add_parser("inspect", parents=[common], help="per-layer kept counts and norm-ratio curves for a prompt")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="the prompt text")
    src.add_argument("--file", type=Path, help="read the prompt from a file")
    i.add_argument("--raw", action="store_true", help="use the text as-is, without the chat template")
    i.add_argument("--no-plot", action="store_true")
    _config_args(i)

    e = sub.add_parser("eval", parents=[common], help="quality: full vs ReFreeKV vs fixed budgets, and ablations")
    e.add_argument("--methods", choices=["main", "ablations", "quick"], default="main")
    e.add_argument("--size", choices=["full", "medium", "quick"], default="full",
                   help="task sizes: full (1k-4k needles), medium (1k-2k), quick (tiny, for CI)")
    e.add_argument("--no-plot", action="store_true")

    b = sub.add_parser("bench", parents=[common], help="speed and memory: prefill overhead, planning, eviction, decode")
    b.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192], help="real-model prompt lengths")
    b.add_argument("--synthetic", type=_ints, default=[1024, 4096, 16384, 32768],
                   help="Llama3-8B-shaped planning lengths")
    b.add_argument("--mlx-lengths", type=_ints, default=[256, 512], help="MLX CPU prompt lengths ('' to skip)")
    b.add_argument("--decode-tokens", type=int, default=32)
    b.add_argument("--repeat", type=int, default=3)
    b.add_argument("--device", default="cpu", help="torch device of the real-model rows: cpu (default), cuda, cuda:N")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="real-model weights and KV dtype (default float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        if a.command == "demo":
            from .main.demo import run_demo

            if a.max_new_tokens < 1:
                p.error(f"--max-new-tokens: received {a.max_new_tokens}; expected an int >= 1")
            result = run_demo(_config(a), a.out, a.max_new_tokens, a.json, a.quick)
        elif a.command == "inspect":
            from .main.inspect_prompt import inspect_prompt

            if a.file is not None and not a.file.is_file():
                p.error(f"--file: received {str(a.file)!r}; expected an existing text file")
            text = a.file.read_text() if a.file is not None else a.text
            if not text.strip():
                p.error("text: received an empty prompt; expected some text")
            result = inspect_prompt(text, _config(a), a.out, raw=a.raw, plot=not a.no_plot, as_json=a.json)
        elif a.command == "eval":
            from .main.evaluate import evaluate

            result = evaluate(a.methods, a.size, a.out, plot=not a.no_plot, as_json=a.json)
        else:
            from .main.bench import run_bench

            if min(a.lengths + a.synthetic + a.mlx_lengths, default=1) < 8:
                p.error("--lengths/--synthetic/--mlx-lengths: received a length below 8; expected prompt lengths >= 8")
            if a.device != "cpu":
                import torch

                if not (a.device.startswith("cuda") and torch.cuda.is_available()):
                    p.error(f"--device: received {a.device!r}; expected cpu, or cuda[:N] on a machine with CUDA "
                            f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
            result = run_bench(a.lengths, a.synthetic, a.mlx_lengths, a.decode_tokens, a.repeat, a.out, a.json,
                               a.device, a.dtype)
    except ReFreeKVError as err:
        p.error(str(err))
    if a.json:
        json.dump(result, sys.stdout, indent=2, default=float)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
