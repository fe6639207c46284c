"""Ten turns typed into mlx-lm's terminal chat (`mlx_lm chat`), plain and through `refreekv chat`.

    python scripts/mlx_chat_turns.py [--split test] [--max-tokens 32] [--configs "default;--replan history"]

The turns are the first conversation of `refreekv eval --task conversation` on the split (five passages
with a code each, then five questions), one line each (mlx_lm.chat reads a line per turn; newlines become
spaces). Each chat runs as a subprocess; the table gives per turn whether the answer is the plain chat's,
and the KV memory each ReFreeKV plan logged (before -> after), next to the full cache's at the same number of
tokens (bytes per token from the first plan, made on an uncompressed cache). mlx_lm.chat sends each turn alone
and keeps one cache for the conversation, so this is mlx-lm's own chat flow. `--out FILE.md` also writes the
table and the summary there.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

PLAN = re.compile(r"refreekv: planned \d+ layers at (\d+) tokens: budget ([\d.]+)%, KV ([\d.]+) -> ([\d.]+) MB")


def answers(stdout: str) -> list[str]:
    """The streamed answers, one per turn: the text between each prompt marker and its speed line."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stdout).replace("\x01", "").replace("\x02", "")
    out = []
    for chunk in text.split("›")[1:]:
        lines = [ln for ln in chunk.splitlines() if ln.strip() and "─" not in ln]
        speed = [i for i, ln in enumerate(lines) if "tok/s" in ln]
        if speed:
            out.append(" ".join(ln.strip() for ln in lines[:speed[0]]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--configs", default="default;--replan history",
                    help="';'-separated refreekv configuration options ('default' for none)")
    ap.add_argument("--out", help="also write the table and the summary to this Markdown file")
    a = ap.parse_args()
    from refreekv.commands.conversation import conversations
    from refreekv.commands.models import exported_model_dir, load_torch

    _, tok = load_torch()
    turns = conversations(tok, a.split, 1)[0]
    typed = "".join(" ".join(text.split()) + "\n" for text, _ in turns) + "q\n"
    opts = ["--max-tokens", str(a.max_tokens)]
    runs = {"plain": [sys.executable, "-m", "mlx_lm", "chat", "--model", str(exported_model_dir()), *opts]}
    for c in a.configs.split(";"):
        extra = [] if c.strip() == "default" else shlex.split(c)
        runs[c.strip()] = [sys.executable, "-m", "refreekv.cli", "chat", *extra, "--", *opts]
    results = {}
    for name, cmd in runs.items():
        t0 = time.perf_counter()
        r = subprocess.run(cmd, input=typed, capture_output=True, text=True, timeout=3600)
        if r.returncode:
            sys.exit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
        results[name] = (answers(r.stdout), PLAN.findall(r.stderr), time.perf_counter() - t0)
        print(f"{name}: {results[name][2]:.0f} s", file=sys.stderr)
    plain = results["plain"][0]
    assert len(plain) == len(turns), (len(plain), len(turns))
    first = next(plans[0] for _, plans, _ in list(results.values())[1:] if plans)
    per_token = float(first[2]) / int(first[0])  # MB per token of an uncompressed cache
    table = Table(title=f"mlx_lm.chat, {len(turns)} turns ({a.split} split, --max-tokens {a.max_tokens})")
    table.add_column("turn", justify="right")
    table.add_column("expects")
    table.add_column("full cache MB at the plan", justify="right")
    for name in results:
        if name != "plain":
            table.add_column(f"{name}: same as plain")
            table.add_column(f"{name}: plan (budget, KV MB)")
    for i, (_, expect) in enumerate(turns):
        p = results[list(results)[1]][1]
        row = [str(i + 1), expect or "", f"{int(p[i][0]) * per_token:.2f}" if i < len(p) else "-"]
        for name, (ans, plans, _) in results.items():
            if name == "plain":
                continue
            row.append("yes" if i < len(ans) and ans[i] == plain[i] else "NO")
            p = plans[i] if i < len(plans) else None
            row.append(f"{p[1]} %, {p[2]} -> {p[3]}" if p else "-")
        table.add_row(*row)
    console = Console(record=True, width=140)
    console.print(table)
    lines = []
    for name, (ans, plans, secs) in results.items():
        same = sum(x == y for x, y in zip(ans, plain))
        lines.append(f"{name}: {same} of {len(plain)} answers as the plain chat, {len(plans)} plans, {secs:.0f} s")
    for i, ans in enumerate(plain):
        lines.append(f"turn {i + 1} plain: {ans[:100]!r}")
    for name, (ans, _, _) in results.items():
        for i, x in enumerate(ans):
            if name != "plain" and x != plain[i]:
                lines.append(f"turn {i + 1} {name}: {x[:100]!r}")
    for line in lines:
        console.print(line, markup=False, highlight=False)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"`python scripts/mlx_chat_turns.py --split {a.split} --max-tokens {a.max_tokens}`\n\n```text\n"
                    + console.export_text() + "```\n")


if __name__ == "__main__":
    main()
