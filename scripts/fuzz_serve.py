"""Odd requests sent to a plain `transformers serve` and to one with ReFreeKV caches (`serve_caches()`).

    python scripts/fuzz_serve.py

Each request goes to both servers (each in a process of its own, one after the other); the table gives both HTTP
statuses and, where they are not both 200, both bodies' ends. What it checks: ReFreeKV never turns a
request the plain server serves into an error, and an error of ours names the argument (HTTP 400), where
the plain server's is often a bare 500.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request

from rich.console import Console
from rich.table import Table
from transformers_serve_chat import running  # this folder's script: a server in a process of its own

from refreekv import ReFreeKVConfig
from refreekv.commands.models import exported_model_dir

HI = [{"role": "user", "content": "hi"}]
CASES = {
    "empty messages": ("chat/completions", {"messages": []}),
    "max_tokens 0": ("chat/completions", {"messages": HI, "max_tokens": 0}),
    "max_tokens 1": ("chat/completions", {"messages": HI, "max_tokens": 1}),
    "n=2": ("chat/completions", {"messages": HI, "max_tokens": 4, "n": 2}),
    "stop": ("chat/completions", {"messages": [{"role": "user", "content": "Count: 1, 2, 3"}], "max_tokens": 12,
                                  "stop": [","], "temperature": 0}),
    "sampling seed": ("chat/completions", {"messages": HI, "max_tokens": 6, "temperature": 0.9, "seed": 3}),
    "logprobs": ("chat/completions", {"messages": HI, "max_tokens": 4, "logprobs": True}),
    "system only": ("chat/completions", {"messages": [{"role": "system", "content": "be brief"}], "max_tokens": 4}),
    "one-token prompt completion": ("completions", {"prompt": "a", "max_tokens": 4, "temperature": 0}),
    "empty prompt completion": ("completions", {"prompt": "", "max_tokens": 4}),
    "long 9k": ("chat/completions", {"messages": [{"role": "user", "content": "The quick brown fox jumps over the "
                                                   "lazy dog. " * 900}], "max_tokens": 2, "temperature": 0}),
    "gen cfg num_beams": ("chat/completions", {"messages": HI, "generation_config": json.dumps(
        {"num_beams": 2, "max_new_tokens": 4})}),
    "gen cfg num_return_sequences": ("chat/completions", {"messages": HI, "generation_config": json.dumps(
        {"num_return_sequences": 2, "do_sample": True, "max_new_tokens": 4})}),
    "stream max_tokens 1": ("chat/completions", {"messages": HI, "max_tokens": 1, "stream": True}),
    "responses": ("responses", {"input": "hi", "max_output_tokens": 4}),
}


def post(model: str, port: int, path: str, body: dict) -> tuple[int | str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}", json.dumps({"model": model, **body}).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()[-300:]
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()[-300:]
    except OSError as err:
        return "no answer", repr(err)[:200]


def main() -> None:
    logging.getLogger("uvicorn.access").disabled = True  # one line per request otherwise
    model = str(exported_model_dir())
    res = {}
    for mode in ("plain", "ReFreeKV"):
        with running(model, ReFreeKVConfig() if mode == "ReFreeKV" else None) as (port, _):
            for name, (path, body) in CASES.items():
                res[mode, name] = post(model, port, path, body)
    table = Table(title="transformers serve: plain against ReFreeKV caches, same requests")
    for col in ("request", "plain", "ReFreeKV", "bodies (where not both 200)"):
        table.add_column(col)
    for name in CASES:
        a, b = res["plain", name], res["ReFreeKV", name]
        note = "" if a[0] == b[0] == 200 else f"plain: {a[1][-160:]}\nReFreeKV: {b[1][-160:]}"
        table.add_row(name, str(a[0]), str(b[0]), note)
    Console(width=160).print(table)
    worse = [n for n in CASES if res["plain", n][0] == 200 and res["ReFreeKV", n][0] != 200]
    print(f"{len(CASES)} requests; served by the plain server but refused or failed with ReFreeKV: {worse or 'none'}")


if __name__ == "__main__":
    main()
