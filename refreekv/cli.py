"""The ``refreekv`` command: demo, inspect, eval, bench, serve, chat (see ``refreekv <command> --help``).

Every command takes the same configuration options, built from ``ReFreeKVConfig``'s fields and
the rule tables in ``refreekv.rules``: the choices and help lines below are those tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from . import rules
from .config import ReFreeKVConfig
from .errors import ReFreeKVError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected comma-separated integers, e.g. 1024,2048")


KINDS = ("needle", "multikey", "continuation", "open")


def _kinds(text: str) -> list[str]:
    kinds = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))  # each kind once, in order
    if not kinds or any(k not in KINDS for k in kinds):
        raise argparse.ArgumentTypeError(f"received {text!r}; expected comma-separated prompt kinds among "
                                         f"{', '.join(KINDS)}, e.g. continuation")
    return kinds


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"received {text!r}; expected an int (a count) or a float in (0, 1)")


def _tail_bits(text: str) -> int | str:
    """--tail-bits: one of rules.TAIL_BITS, or "none" (what the rule evicts is dropped)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        bits = int(text)
    except ValueError:
        bits = None
    if bits not in rules.TAIL_BITS:
        raise argparse.ArgumentTypeError(f"received {text!r}; expected " + ", ".join(map(str, rules.TAIL_BITS))
                                         + " or none")
    return bits


def _choices(table: dict) -> str:
    return "; ".join(f"{k}: {v}" for k, v in table.items())


def _config_args(p: argparse.ArgumentParser) -> None:
    d = ReFreeKVConfig()
    g = p.add_argument_group("ReFreeKV configuration (defaults: the library's default, ReFreeKVConfig())")
    start = g.add_mutually_exclusive_group()
    start.add_argument("--paper", action="store_true",
                       help="start from the paper's exact configuration (ReFreeKVConfig.paper(): evicts, no tail) "
                       "instead of the default")
    start.add_argument("--evicting", action="store_true",
                       help="start from the eviction rule (ReFreeKVConfig.evicting(): 32 score rows, every head "
                       "counted, T = 0.125 %%, what it evicts dropped) instead of the default")
    g.add_argument("--threshold", type=float, help=f"T, the tolerated norm ratio (default {d.threshold})")
    g.add_argument("--sinks", type=int, help=f"attention-sink tokens always kept (default {d.sinks})")
    g.add_argument("--retained-layers", type=_ints,
                   help=f"layers never compressed, comma-separated (default {','.join(map(str, d.retained_layers))})")
    g.add_argument("--query-rows", type=_number, help=f"k: newest queries that score positions, a count or a "
                   f"fraction of n (default {d.query_rows})")
    g.add_argument("--combine", choices=list(rules.COMBINES), help=f"{_choices(rules.COMBINES)} (default {d.combine})")
    g.add_argument("--norm", choices=list(rules.NORMS), help=f"{_choices(rules.NORMS)} (default {d.norm})")
    g.add_argument("--heads", choices=list(rules.HEADS), help=f"{_choices(rules.HEADS)} (default {d.heads})")
    g.add_argument("--norm-scope", choices=list(rules.NORM_SCOPES),
                   help=f"{_choices(rules.NORM_SCOPES)} (default {d.norm_scope})")
    g.add_argument("--ranking", choices=list(rules.RANKINGS),
                   help="; ".join(f"{r.name}: {r.summary}" for r in rules.RANKINGS.values()) + f" (default {d.ranking})")
    g.add_argument("--window", type=int, help=f"newest tokens kept first by attention rankings (default {d.window})")
    g.add_argument("--pool-kernel", type=int, help=f"max-pool width of snapkv/pooled (default {d.pool_kernel})")
    g.add_argument("--halting", choices=list(rules.HALTINGS), help=f"{_choices(rules.HALTINGS)} (default {d.halting})")
    g.add_argument("--budget", type=_number, help="the fixed budget for --halting ratio|count")
    g.add_argument("--replan", choices=list(rules.REPLANS),
                   help="; ".join(f"{r.name}: {r.summary}" for r in rules.REPLANS.values()) + f" (default {d.replan})")
    g.add_argument("--replan-every", type=int, help="also re-plan every N generated tokens (default 0: never)")
    g.add_argument("--mass-threshold", type=float, help="Tm: also keep until the evicted attention mass is <= Tm, "
                   "a floor under the threshold rule's cut (default: off)")
    g.add_argument("--tail-bits", type=_tail_bits, metavar="{" + ",".join(map(str, rules.TAIL_BITS)) + ",none}",
                   help="keep what the rule evicts quantized to this many bits; none: drop it "
                   f"(default {d.tail_bits}; --paper and --evicting: none; the kvpress press stores no tail)")


_FIELDS = ("threshold", "sinks", "retained_layers", "query_rows", "combine", "norm", "heads", "norm_scope",
           "ranking", "window", "pool_kernel", "halting", "budget", "replan", "replan_every", "mass_threshold",
           "tail_bits")


def config_from(a: argparse.Namespace) -> ReFreeKVConfig:
    """The configuration the options describe: the default (or the paper's, or the eviction rule) with the
    given changes."""
    changes = {f: getattr(a, f) for f in _FIELDS if getattr(a, f, None) is not None}
    if "retained_layers" in changes:
        changes["retained_layers"] = tuple(changes["retained_layers"])
    if changes.get("tail_bits") == "none":
        changes["tail_bits"] = None
    if a.paper:
        return ReFreeKVConfig.paper(**changes)
    return ReFreeKVConfig.evicting(**changes) if getattr(a, "evicting", False) else ReFreeKVConfig(**changes)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where it has none (None, or a flag's False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    fmt = _Help
    p = argparse.ArgumentParser(prog="refreekv", formatter_class=fmt, description="Threshold-free KV-cache compression "
                                "(ReFreeKV) on the packaged SmolLM2-135M-Instruct.")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="results", help="folder for JSON, Markdown and PNG results")
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout (progress on stderr)")

    d = sub.add_parser("demo", parents=[common], formatter_class=fmt,
                       help="full cache vs ReFreeKV on a handful of prompts, or on yours (about 30 s here)")
    _config_args(d)
    d.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per answer")
    d.add_argument("--quick", action="store_true", help="two short prompts only (a smoke test)")
    d.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="your own prompt instead of the demo's (repeatable; the chat template is applied)")
    d.add_argument("--prompt-file", action="append", default=[], type=Path, metavar="FILE",
                   help="your own prompt read from a text file (repeatable)")

    i = sub.add_parser("inspect", parents=[common], formatter_class=fmt,
                       help="per-layer kept counts and norm-ratio curves for a prompt")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="the prompt text")
    src.add_argument("--file", type=Path, help="read the prompt from a file")
    i.add_argument("--raw", action="store_true", help="use the text as-is, without the chat template")
    i.add_argument("--no-plot", action="store_true", help="skip inspect.png")
    _config_args(i)

    e = sub.add_parser("eval", parents=[common], formatter_class=fmt,
                       help="quality: full cache vs ReFreeKV vs the fixed-budget front, on the dev, test or "
                       "holdout split")
    e.add_argument("--task", choices=["benchmark", "conversation", "generation"], default="benchmark",
                   help="benchmark: needles, multi-key, continuations, open questions; conversation: 10-turn "
                   "chats (full vs compress once vs re-plan each turn vs re-plan with the turn kept whole); "
                   "generation: a long generation with and without re-planning")
    e.add_argument("--conversations", type=int, default=3, help="--task conversation: how many 10-turn chats")
    e.add_argument("--gen-tokens", type=int, default=1024, help="--task generation: tokens generated")
    e.add_argument("--every", type=int, default=128, help="--task generation: re-plan every this many tokens")
    e.add_argument("--methods", choices=["main", "front", "variants", "candidates", "thresholds", "options", "heads", "holdout",
                                         "tail", "ablations", "quick"],
                   default="main", help="main: the default, the eviction rule (--evicting), the paper and the fixed-budget "
                   "front; variants: the threshold-free design space; candidates: the second-round variants (around "
                   "T = 0.1 %%); thresholds: the eviction rule at other thresholds, halting norms and mass floors, with "
                   "the fixed-budget front; options: the three rules round three chose among; heads: round four (every "
                   "head's own ratio counted equally); tail: the default, the eviction rule and the paper, and the "
                   "paper's and eviction rule's boundaries with 4- and 8-bit tails (round five, through the "
                   "transformers cache); holdout: the default, the eviction rule, the paper, the eviction defaults "
                   "before rounds four and three and SnapKV/StreamingLLM at 70 and 80 %%")
    e.add_argument("--split", choices=["dev", "test", "holdout"], default="holdout",
                   help="dev and test: choose on them; holdout: report on it")
    e.add_argument("--size", choices=["full", "medium", "quick"], default="full",
                   help="full: 60 needles at 1k-7.5k tokens + 24 other prompts; medium: 1k-2k; quick: a smoke test")
    e.add_argument("--limit", type=int, help="only the first N prompts")
    e.add_argument("--max-length", type=int, help="only prompts of at most this many tokens (e.g. 4096 leaves "
                   "out the 7.5k needles, the slowest quarter of the run)")
    e.add_argument("--min-length", type=int, help="only prompts of at least this many tokens")
    e.add_argument("--kinds", type=_kinds, help="only prompts of these kinds (comma-separated: "
                   + ", ".join(KINDS) + "), e.g. continuation")
    e.add_argument("--no-cache", action="store_true", help="recompute everything (ignore <out>/eval_cache.jsonl)")
    e.add_argument("--no-plot", action="store_true", help="skip the PNG")
    _config_args(e)

    b = sub.add_parser("bench", parents=[common], formatter_class=fmt,
                       help="speed and memory: prefill overhead, planning, eviction, decode, operator counts")
    b.add_argument("--quick", action="store_true", help="one short length per part, one repeat (about a minute)")
    b.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192], help="real-model prompt lengths")
    b.add_argument("--synthetic", type=_ints, default=[1024, 4096, 16384, 32768],
                   help="Llama3-8B-shaped planning lengths ('' to skip)")
    b.add_argument("--mlx-lengths", type=_ints, default=[256, 512], help="MLX CPU prompt lengths ('' to skip)")
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per decode measurement")
    b.add_argument("--repeat", type=int, default=3, help="repeats per timing (median)")
    b.add_argument("--device", default="cpu", help="torch device of the real-model rows: cpu, cuda, cuda:N")
    b.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="real-model weights and KV dtype")
    _config_args(b)

    v = sub.add_parser("serve", formatter_class=fmt,
                       help="an OpenAI-compatible HTTP server with ReFreeKV caches: mlx_lm.server (its prompt cache "
                       "reuses ours turn after turn) or, with --engine transformers, transformers serve (a ReFreeKV "
                       "cache per conversation, continued turn after turn); options after -- go to that server (its model defaults to the "
                       "packaged SmolLM2)")
    v.add_argument("--engine", choices=["mlx-lm", "transformers"], default="mlx-lm",
                   help="which server: mlx_lm.server, or transformers serve")
    v.add_argument("--prompt-cache-size", type=int, default=None,
                   help="transformers serve: conversations held between requests per model, each continued when "
                   "a request extends it (default 4; 0: a fresh cache per request). mlx_lm.server has its own, "
                   "after --")
    _config_args(v)
    v.add_argument("mlx_lm_args", nargs=argparse.REMAINDER, metavar="-- SERVER_OPTIONS",
                   help="the server's own options, e.g. -- --port 8080 --model PATH (mlx-lm) or -- --port 8080 "
                   "PATH (transformers serve)")

    c = sub.add_parser("chat", formatter_class=fmt,
                       help="mlx_lm.chat (mlx-lm's terminal chat) with a ReFreeKV prompt cache, planned again at each "
                       "turn, each plan shown on stderr; options after -- go to mlx_lm.chat (--model defaults to the "
                       "packaged SmolLM2)")
    _config_args(c)
    c.add_argument("mlx_lm_args", nargs=argparse.REMAINDER, metavar="-- CHAT_OPTIONS",
                   help="mlx_lm.chat's own options, e.g. -- --max-tokens 128 --model PATH")
    return p


# mlx-lm options that make a cache ReFreeKV does not combine with, per command.
_REFUSED = {"serve": {"--kv-bits": ("a quantized KV cache", "a ReFreeKV cache is not quantized")},
            "chat": {"--max-kv-size": ("a rotating KV window", "a rotating window and ReFreeKV do not combine")}}


def _mlx_lm_args(p: argparse.ArgumentParser, command: str, args: list[str]) -> list[str]:
    """The options after ``--`` for mlx_lm.server / mlx_lm.chat, checked; ``--model`` defaults to the packaged
    SmolLM2 (exported to MLX on first use)."""
    args = args[1:] if args[:1] == ["--"] else list(args)
    for flag, (what, why) in _REFUSED[command].items():
        given = next((x for x in args if x == flag or x.startswith(flag + "=")), None)
        if given is not None:
            p.error(f"{given}: received {what}; expected none ({why})")
    if not any(x == "--model" or x.startswith("--model=") for x in args):
        from .commands.models import exported_model_dir

        args = ["--model", str(exported_model_dir()), *args]
    return args


def _transformers_serve_args(p: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """The arguments after ``--`` for transformers serve, read by its own parser; the model defaults to the
    packaged SmolLM2 (exported on first use). What the parser refuses, and the settings that serve without
    a ReFreeKV cache (continuous batching, --compile's static cache), are ReFreeKVErrors: main's usage
    errors, before the server starts."""
    from .adapters.transformers_serve import refuse_settings, server_options

    args = args[1:] if args[:1] == ["--"] else list(args)
    opts = server_options(args)
    refuse_settings(opts)
    if opts["force_model"] is None:
        from .commands.models import exported_model_dir

        args = [*args, str(exported_model_dir())]
    return args


#: what each command imports, and the extra that installs it
_NEEDS = {"serve": (("mlx_lm",), "mlxlm"), "chat": (("mlx_lm",), "mlxlm"),
          "serve transformers": (("torch", "transformers", "fastapi", "uvicorn", "openai"), "hfserve"),
          **{c: (("torch", "transformers"), "hf") for c in ("demo", "inspect", "eval", "bench")}}


def _check_installed(p: argparse.ArgumentParser, command: str) -> None:
    """One usage error naming the missing package, before anything imports it."""
    from importlib.util import find_spec

    modules, extra = _NEEDS[command]
    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        p.error(f"{command}: received an environment without {', '.join(missing)}; expected it installed "
                f"(pip install 'refreekv[{extra}]')")


def _text_file(p: argparse.ArgumentParser, flag: str, path: Path) -> str:
    """A prompt file's text, or one usage error naming the flag (missing, unreadable, not UTF-8)."""
    if not path.is_file():
        p.error(f"{flag}: received {str(path)!r}; expected an existing text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        p.error(f"{flag}: received {str(path)!r}, which is not UTF-8 text (byte {err.start}); expected a UTF-8 text file")
    except OSError as err:
        p.error(f"{flag}: received {str(path)!r}, unreadable ({err.strerror}); expected a readable text file")


def _check_out(p: argparse.ArgumentParser, out: str) -> None:
    """--out must be a folder, or a path where one can be made: checked before any work."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        p.error(f"--out: received {out!r}, an existing file; expected a folder for the results")
    parent = next((q for q in [path, *path.parents] if q.exists()), None)
    if parent is not None and (not parent.is_dir() or not os.access(parent, os.W_OK)):
        p.error(f"--out: received {out!r}; expected a folder that can be created ({str(parent)!r} is "
                f"{'not a folder' if not parent.is_dir() else 'not writable'})")


@contextlib.contextmanager
def _plans_on_stderr():
    """The ``refreekv`` logger's INFO lines (one per plan) shown on stderr while the block runs."""
    import logging

    log = logging.getLogger("refreekv")
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(shown)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(shown)
        log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    engine = getattr(a, "engine", "mlx-lm")
    _check_installed(p, "serve transformers" if a.command == "serve" and engine == "transformers" else a.command)
    try:
        config = config_from(a)
        if a.command not in ("serve", "chat"):
            _check_out(p, a.out)
        if a.command == "serve" and engine == "transformers":
            from .adapters.transformers_serve import serve as serve_transformers

            args = _transformers_serve_args(p, a.mlx_lm_args)
            size = {} if a.prompt_cache_size is None else {"prompt_cache_size": a.prompt_cache_size}
            with _plans_on_stderr():
                serve_transformers(args, config, **size)  # serve_caches checks the size before the server starts
            return 0
        if a.command == "serve" and a.prompt_cache_size is not None:
            p.error(f"--prompt-cache-size: received {a.prompt_cache_size} with --engine mlx-lm; expected it after -- "
                    "(mlx_lm.server's own --prompt-cache-size)")
        if a.command == "serve":
            from .adapters.mlx_lm import serve

            serve(_mlx_lm_args(p, "serve", a.mlx_lm_args), config)
            return 0
        if a.command == "chat":
            from .adapters.mlx_lm import chat

            args = _mlx_lm_args(p, "chat", a.mlx_lm_args)
            with _plans_on_stderr():
                chat(args, config)
            return 0
        if a.command == "demo":
            from .commands.demo import run_demo

            if a.max_new_tokens < 1:
                p.error(f"--max-new-tokens: received {a.max_new_tokens}; expected an int >= 1")
            texts = [("--prompt", t) for t in a.prompt]
            for f in a.prompt_file:
                texts.append(("--prompt-file", _text_file(p, "--prompt-file", f)))
            for flag, t in texts:
                if not t.strip():
                    p.error(f"{flag}: received an empty prompt; expected some text")
            if texts and a.quick:
                p.error("--quick: received with --prompt/--prompt-file; expected one of them (--quick runs the "
                        "demo's two short prompts)")
            result = run_demo(config, a.out, a.max_new_tokens, a.json, a.quick, [t for _, t in texts])
        elif a.command == "inspect":
            from .commands.inspect_prompt import inspect_prompt

            text = _text_file(p, "--file", a.file) if a.file is not None else a.text
            if not text.strip():
                p.error("text: received an empty prompt; expected some text")
            result = inspect_prompt(text, config, a.out, raw=a.raw, plot=not a.no_plot, as_json=a.json)
        elif a.command == "eval" and a.task != "benchmark":
            from .commands.conversation import run_conversation, run_generation

            for flag, value in (("--conversations", a.conversations), ("--gen-tokens", a.gen_tokens),
                                ("--every", a.every)):
                if value < 1:
                    p.error(f"{flag}: received {value}; expected an int >= 1")
            result = (run_conversation(a.split, a.out, a.conversations, a.json, config) if a.task == "conversation"
                      else run_generation(a.split, a.out, a.gen_tokens, a.every, a.json, config))
        elif a.command == "eval":
            from .commands.evaluate import evaluate

            if a.limit is not None and a.limit < 1:
                p.error(f"--limit: received {a.limit}; expected an int >= 1")
            for flag, v in (("--max-length", a.max_length), ("--min-length", a.min_length)):
                if v is not None and v < 1:
                    p.error(f"{flag}: received {v}; expected an int >= 1")
            if a.min_length is not None and a.max_length is not None and a.min_length > a.max_length:
                p.error(f"--min-length: received {a.min_length} with --max-length {a.max_length}; "
                        "expected at most the maximum")
            result = evaluate(a.methods, a.split, a.size, a.out, default=config, plot=not a.no_plot, as_json=a.json,
                              use_cache=not a.no_cache, limit=a.limit, max_length=a.max_length,
                              min_length=a.min_length, kinds=a.kinds)
        else:
            from .commands.bench import run_bench

            if a.quick:
                a.lengths, a.synthetic, a.mlx_lengths, a.repeat, a.decode_tokens = [512], [1024], [], 1, 8
            for flag, values in (("--lengths", a.lengths), ("--synthetic", a.synthetic), ("--mlx-lengths", a.mlx_lengths)):
                if min(values, default=8) < 8:
                    p.error(f"{flag}: received {','.join(map(str, values))}; expected prompt lengths >= 8")
            for flag, value in (("--repeat", a.repeat), ("--decode-tokens", a.decode_tokens)):
                if value < 1:
                    p.error(f"{flag}: received {value}; expected an int >= 1")
            if a.device != "cpu":
                import torch

                if not (a.device.startswith("cuda") and torch.cuda.is_available()):
                    p.error(f"--device: received {a.device!r}; expected cpu, or cuda[:N] on a machine with CUDA "
                            f"(torch.cuda.is_available() is {torch.cuda.is_available()})")
            result = run_bench(a.lengths, a.synthetic, a.mlx_lengths, a.decode_tokens, a.repeat, a.out, a.json,
                               a.device, a.dtype, config)
    except ReFreeKVError as err:
        p.error(str(err))
    if a.json:
        json.dump(result, sys.stdout, indent=2, default=float)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
