"""Odd requests sent to a plain `transformers serve` and to one with ReFreeKV caches (`serve_caches()`).

    python scripts/fuzz_serve.py

Each request goes to both servers (in this process, one after the other); the table gives both HTTP
statuses and, where they differ or are not 200, both bodies' ends. What it checks: ReFreeKV never turns a
request the plain server serves into an error, and an error of ours names the argument (HTTP 400), where
the plain server's is often a bare 500.
"""
import json
import socket
import time
import urllib.request
import logging
from contextlib import nullcontext
from refreekv.commands.models import exported_model_dir
from refreekv.adapters.transformers_serve import serve_caches
from transformers.cli.serve import Serve
logging.getLogger("uvicorn.access").disabled = True  # one line per request otherwise
M=str(exported_model_dir())
long_text = ("The quick brown fox jumps over the lazy dog. " * 900)
cases = {
 "empty messages": ("chat/completions", {"messages": []}),
 "max_tokens 0": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 0}),
 "max_tokens 1": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 1}),
 "n=2": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 4, "n": 2}),
 "stop": ("chat/completions", {"messages": [{"role":"user","content":"Count: 1, 2, 3"}], "max_tokens": 12, "stop": [","], "temperature": 0}),
 "sampling seed": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 6, "temperature": 0.9, "seed": 3}),
 "logprobs": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 4, "logprobs": True}),
 "system only": ("chat/completions", {"messages": [{"role":"system","content":"be brief"}], "max_tokens": 4}),
 "one-token prompt completion": ("completions", {"prompt": "a", "max_tokens": 4, "temperature": 0}),
 "empty prompt completion": ("completions", {"prompt": "", "max_tokens": 4}),
 "long 9k": ("chat/completions", {"messages": [{"role":"user","content":long_text}], "max_tokens": 2, "temperature": 0}),
 "gen cfg num_beams": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "generation_config": json.dumps({"num_beams": 2, "max_new_tokens": 4})}),
 "gen cfg num_return_sequences": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "generation_config": json.dumps({"num_return_sequences": 2, "do_sample": True, "max_new_tokens": 4})}),
 "stream max_tokens 1": ("chat/completions", {"messages": [{"role":"user","content":"hi"}], "max_tokens": 1, "stream": True}),
 "responses": ("responses", {"input": "hi", "max_output_tokens": 4}),
}
def up():
    s=socket.socket(); s.bind(("127.0.0.1",0)); port=s.getsockname()[1]; s.close()
    srv=Serve(force_model=M, port=port, non_blocking=True, device="cpu", dtype="float32", log_level="error")
    for _ in range(100):
        try: urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).close(); break
        except Exception: time.sleep(0.2)
    return srv, port
def post(port, path, body):
    req=urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}", json.dumps({"model":M,**body}).encode(), {"Content-Type":"application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r: return r.status, r.read().decode()[-300:]
    except urllib.error.HTTPError as e: return e.code, e.read().decode()[-300:]
    except OSError as e: return "EXC", repr(e)[:200]
res={}
for mode in ("plain","refreekv"):
    with (serve_caches() if mode=="refreekv" else nullcontext()):
        srv, port = up()
        for k,(path,body) in cases.items():
            res[(mode,k)] = post(port, path, body)
        srv.kill_server()
from rich.console import Console
from rich.table import Table

table = Table(title="transformers serve: plain against ReFreeKV caches, same requests")
for col in ("request", "plain", "ReFreeKV", "bodies (where not both 200)"):
    table.add_column(col)
for k in cases:
    a, b = res[("plain", k)], res[("refreekv", k)]
    note = "" if a[0] == b[0] == 200 else f"plain: {a[1][-160:]}\nReFreeKV: {b[1][-160:]}"
    table.add_row(k, str(a[0]), str(b[0]), note)
Console(width=160).print(table)
worse = [k for k in cases if res[("plain", k)][0] == 200 and res[("refreekv", k)][0] != 200]
print(f"{len(cases)} requests; served by the plain server but refused or failed with ReFreeKV: {worse or 'none'}")
