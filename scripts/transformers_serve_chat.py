"""Ten chat turns sent to `transformers serve`, plain and with ReFreeKV caches (`serve_caches`).

    python scripts/transformers_serve_chat.py [--split test] [--max-tokens 16] [--out FILE.md]

The turns are the first conversation of `refreekv eval --task conversation` on the split (five passages
with a code each, then five questions). As an OpenAI client does, each request sends the whole chat so far,
greedy (`temperature 0`). Each server runs in a process of its own, one after the other: the plain server (a fresh
full cache per request, transformers keeps none between requests), then ReFreeKV at `T = 0` (exact: the
answers must be the plain server's), with the default (`replan="turns"`) and with `replan="history"`. Per
turn: whether the answer is the plain server's, the request's wall time, and the KV bytes the server holds
for the conversation after the request (the held cache; for the plain server, which holds none, what a full
cache of the conversation would hold: bytes per token from the `T = 0` run).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
import urllib.request
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table

from refreekv import ReFreeKVConfig
from refreekv.commands.conversation import conversations
from refreekv.commands.models import exported_model_dir


#: a transformers serve server: plain, or inside serve_caches (argv: the model, the port, then for ReFreeKV
#: the configuration's fields as JSON)
SERVER = """
import json, logging, sys
from transformers.cli.serve import Serve
options = dict(force_model=sys.argv[1], port=int(sys.argv[2]), device="cpu", dtype="float32", log_level="error")
if len(sys.argv) == 3:
    Serve(**options)
else:
    from refreekv import ReFreeKVConfig
    from adapters.transformers_serve import serve_caches
    logging.getLogger("refreekv").setLevel(logging.INFO)  # the model's process logs what it holds, on stderr
    with serve_caches(ReFreeKVConfig(**json.loads(sys.argv[3]))):
        Serve(**options)
"""


@contextmanager
def running(model: str, config: ReFreeKVConfig | None = None):
    """A transformers serve server (with ReFreeKV caches of ``config``, plain for None) in a process of its
    own, stopped on exit. Yields its port and a function that reads its log (stdout and stderr)."""
    import dataclasses
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = [] if config is None else [json.dumps({k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in dataclasses.asdict(config).items()})]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, model, str(port), *extra], stdout=log,
                                stderr=subprocess.STDOUT)

        def read() -> str:
            log.seek(0)
            return log.read()

        try:
            for _ in range(3000):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError("the server stopped: " + read()[-3000:]) from None
                    time.sleep(0.2)
            yield port, read
        finally:
            proc.terminate()
            proc.wait(30)


def chat(model: str, port: int, turns, max_tokens: int, log) -> list[tuple[str, float, int, int]]:
    """(answer, seconds, KV bytes held after the request, tokens of the held conversation) per turn: the held
    bytes from the server's newest ``refreekv: holding`` line (0 for a plain server, which holds none), the
    conversation's length from the request's usage (its prompt and answer, but the answer's last token)."""
    messages, rows = [], []
    for text, _ in turns:
        messages.append({"role": "user", "content": text})
        body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.load(r)
        seconds = time.perf_counter() - t0
        answer, usage = out["choices"][0]["message"]["content"], out["usage"]
        rows.append((answer, seconds, _held(log()), usage["prompt_tokens"] + usage["completion_tokens"] - 1))
        messages.append({"role": "assistant", "content": answer})
    return rows


def _held(log: str) -> int:
    """KV bytes the server's newest log line says it holds (to the 0.01 MB it prints)."""
    lines = [x for x in log.splitlines() if x.startswith("refreekv: holding")]
    return round(float(lines[-1].split("KV ")[1].removesuffix(" MB")) * 2**20) if lines else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="test", choices=["dev", "test", "holdout"])
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out", help="also write the table and the summary to this Markdown file")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = str(exported_model_dir())
    turns = conversations(AutoTokenizer.from_pretrained(model), a.split, 1)[0]
    runs = {}
    started = time.perf_counter()
    for name, config in (("plain", None), ("T = 0", ReFreeKVConfig(threshold=0)), ("default", ReFreeKVConfig()),
                         ("history", ReFreeKVConfig(replan="history"))):
        with running(model, config) as (port, log):
            runs[name] = chat(model, port, turns, a.max_tokens, log)
        print(f"{name}: done at {time.perf_counter() - started:.0f} s", flush=True)
    exact = runs["T = 0"]  # keeps every token: its bytes are the full cache's for the same conversation
    per_token = exact[-1][2] / exact[-1][3]
    runs["plain"] = [(a_, s_, int(per_token * t), t) for (a_, s_, _, _), (_, _, _, t) in zip(runs["plain"], exact)]
    plain = [r[0] for r in runs["plain"]]
    title = f"transformers serve, ten turns ({a.split} split, conversation 1, max_tokens {a.max_tokens})"
    table = Table(title=title)
    for col in ("turn", "expects", *(f"{n}: same / s / MB" for n in runs)):
        table.add_column(col)
    md = ["| turn | expects | " + " | ".join(f"{n}: same as plain / s / MB held" for n in runs) + " |",
          "|---" * (2 + len(runs)) + "|"]
    for i, (_, expect) in enumerate(turns):
        cells = [f"{'yes' if rows[i][0] == plain[i] else 'no'} / {rows[i][1]:.1f} / {rows[i][2] / 2**20:.1f}"
                 for rows in runs.values()]
        table.add_row(str(i + 1), expect or "", *cells)
        md.append(f"| {i + 1} | {expect or ''} | " + " | ".join(cells) + " |")
    summary = "; ".join(f"{n}: {sum(r[0] == p for r, p in zip(rows, plain))}/10 answers as plain, "
                        f"{sum(r[1] for r in rows):.1f} s for the ten requests, {rows[-1][2] / 2**20:.1f} MB held after "
                        "turn 10" for n, rows in runs.items())
    Console().print(table)
    print(summary)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# {title}\n\n`python scripts/transformers_serve_chat.py --split {a.split} --max-tokens "
                    f"{a.max_tokens}` ({time.perf_counter() - started:.0f} s here). Cells: the answer is the plain "
                    "server's? / the request's wall time (s) / KV held for the conversation after it (MB; plain holds "
                    "none: what a full cache of it would hold).\n\n" + "\n".join(md) + f"\n\n{summary}\n\nAnswers:\n\n")
            for name, rows in runs.items():
                f.write(f"- {name}: " + json.dumps([r[0] for r in rows]) + "\n")


if __name__ == "__main__":
    main()
