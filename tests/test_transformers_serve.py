"""transformers serve (transformers' OpenAI-compatible HTTP server) with ReFreeKV caches: each request
is served with a fresh ReFreeKVCache planned after its prompt; at T = 0 every answer is the plain
server's; what the cache cannot serve is refused by name, never served uncompressed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv.commands.models import exported_model_dir
from refreekv.commands.prompts import needle_prompt

pytestmark = pytest.mark.model

MODEL = str(exported_model_dir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(port: int, alive=lambda: True, log=lambda: "") -> None:
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
            return
        except OSError:
            assert alive(), log()
            assert time.time() < deadline, "the server did not start: " + log()
            time.sleep(0.3)


#: a transformers serve server in a process of its own, plain or inside serve_caches (argv: the server's
#: options as JSON, then, for ReFreeKV, the configuration's fields as JSON and the prompt cache size)
SERVER = """
import json, sys
from transformers.cli.serve import Serve
options = json.loads(sys.argv[1])
if len(sys.argv) == 2:
    Serve(**options)
else:
    import logging
    from refreekv import ReFreeKVConfig
    from refreekv.adapters.transformers_serve import serve_caches
    logging.getLogger("refreekv").setLevel(logging.INFO)  # its plans, from the model's process, on stderr
    with serve_caches(ReFreeKVConfig(**json.loads(sys.argv[2])), int(sys.argv[3])):
        Serve(**options)
"""


@contextmanager
def running(tmp_path, config: dict | None = None, prompt_cache_size: int = 4, **options):
    """A transformers serve server pinned to the packaged model, in a process of its own: plain, or with
    ReFreeKV caches (``config``: ReFreeKVConfig's fields). Yields its port and a function that reads its log."""
    port = _free_port()
    log = tmp_path / f"serve-{port}.log"
    opts = {"force_model": MODEL, "port": port, "device": "cpu", "dtype": "float32", **options}
    extra = [] if config is None else [json.dumps(config), str(prompt_cache_size)]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(opts), *extra], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)
    try:
        _wait(port, lambda: proc.poll() is None, lambda: log.read_text()[-3000:])
        yield port, log.read_text
    finally:
        proc.terminate()
        proc.wait(30)


def _post(port: int, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/{path}", json.dumps({"model": MODEL, **body}).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _streamed(text: str) -> tuple[str, list[str]]:
    """The content of a chat-completion event stream, and its error events."""
    content, errors = [], []
    for line in text.splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if "error" in event:
            errors.append(event["error"])
        for choice in event.get("choices", []):
            content.append(choice.get("delta", {}).get("content") or "")
    return "".join(content), errors


def _answers(port: int) -> dict:
    """A needle question (non-streaming and streaming), its second turn, the same with an edited first answer,
    another second turn, and a plain completion."""
    first = [{"role": "user", "content": needle_prompt(300, 0.3)}]
    out = {}
    status, text = _post(port, "chat/completions", {"messages": first, "temperature": 0, "max_tokens": 12})
    assert status == 200, text
    out["chat"] = json.loads(text)["choices"][0]["message"]["content"]
    status, text = _post(port, "chat/completions", {"messages": first, "temperature": 0, "max_tokens": 12,
                                                    "stream": True})
    assert status == 200, text
    out["stream"], errors = _streamed(text)
    assert not errors, errors
    second = first + [{"role": "assistant", "content": out["chat"]},
                      {"role": "user", "content": "Say it again, digit by digit."}]
    status, text = _post(port, "chat/completions", {"messages": second, "temperature": 0, "max_tokens": 12})
    assert status == 200, text
    out["second turn"] = json.loads(text)["choices"][0]["message"]["content"]
    # a conversation whose earlier answer the client edited, and a branch from the first turn: a held cache
    # is continued only when the request's ids start with exactly the ids it holds
    for name, answer, question in (("edited", "The magic number is 2024.", "Say it again, digit by digit."),
                                   ("branch", out["chat"], "Is it odd or even?")):
        messages = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
        status, text = _post(port, "chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 12})
        assert status == 200, text
        out[name] = json.loads(text)["choices"][0]["message"]["content"]
    status, text = _post(port, "completions", {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 6})
    assert status == 200, text
    out["completion"] = json.loads(text)["choices"][0]["text"]
    return out


def _lines(log: str, start: str) -> list[str]:
    return [x for x in log.splitlines() if x.startswith(start)]


def _plans(log: str) -> list[tuple[int, float, float, float]]:
    """(tokens, budget %, MB before, MB after) of each plan a server's log shows."""
    rows = []
    for msg in _lines(log, "refreekv: planned"):
        tokens = int(msg.split(" at ")[1].split(" tokens")[0])
        budget = float(msg.split("budget ")[1].split("%")[0])
        before, after = (float(x) for x in msg.split("KV ")[1].removesuffix(" MB").split(" -> "))
        rows.append((tokens, budget, before, after))
    return rows


def test_prompt_caches_continue_the_longest_conversation_a_request_extends():
    import copy

    import torch

    from refreekv.adapters.transformers import ReFreeKVCache
    from refreekv.adapters.transformers_serve_engine import PromptCaches
    from refreekv.commands.models import load_torch

    model, _ = load_torch()
    held = PromptCaches(2)
    a, b, c = (ReFreeKVCache(model) for _ in range(3))
    held.put(torch.tensor([1, 2, 3]), a, model)
    held.put(torch.tensor([1, 2, 3, 4, 5]), b, model)
    assert held.take(torch.tensor([1, 2, 3, 4, 5]), model) == (a, 3)  # a proper prefix only: b holds all of it
    assert held.take(torch.tensor([9, 2, 3, 4]), model) == (None, 0)
    held.put(torch.tensor([1, 2, 3]), a, model)
    held.put(torch.tensor([7]), c, model)                           # the least recently used (b) is dropped
    assert [k.tolist() for k, _ in held.entries] == [[1, 2, 3], [7]]
    assert held.take(torch.tensor([1, 2, 3, 4, 5, 6]), model) == (a, 3)
    assert held.take(torch.tensor([1, 2, 3, 4]), model) == (None, 0)  # a was taken out: one request per cache
    # the same checkpoint loaded again (a server unloads an idle model): the old object's caches are dropped
    again = copy.deepcopy(model)
    assert held.take(torch.tensor([7, 8]), again) == (None, 0) and held.entries == []
    none = PromptCaches(0)
    none.put(torch.tensor([1, 2]), a, model)
    assert none.entries == [] and none.nbytes == 0


def _own_classes():
    from transformers.cli.serving import model_manager, utils

    return utils.GenerationState, model_manager.GenerationState, model_manager.ModelLoader


def test_transformers_serve_answers_as_the_plain_server_at_T0_and_compresses_each_request(tmp_path):
    with running(tmp_path) as (port, log):
        plain = _answers(port)
        assert _plans(log()) == []  # a plain server plans nothing
    assert plain["chat"] == plain["stream"] and "741" in plain["chat"]
    with running(tmp_path, {"threshold": 0}) as (port, log):
        exact = _answers(port)
        text = log()
    assert exact == plain
    plans = _plans(text)
    assert len(plans) == 6 and all(b == 100.0 and before == after for _, b, before, after in plans), text[-3000:]
    assert plans[0][0] == plans[1][0] < plans[2][0]
    lines = _lines(text, "refreekv: planned")
    # the second turn and the branch continued a first turn's cache; the edited conversation did not
    assert ["from the prompt cache" in x for x in lines] == [False, False, True, False, True, False], lines
    with running(tmp_path, {"threshold": 0}, prompt_cache_size=0) as (port, log):
        assert _answers(port) == plain  # a fresh cache for each request
        text = log()
    assert len(_plans(text)) == 6 and "from the prompt cache" not in text and "refreekv: holding" not in text
    with running(tmp_path, {}) as (port, log):
        default = _answers(port)
        text = log()
    plans = _plans(text)
    assert len(plans) == 6 and all(b < 100 and after < before for _, b, before, after in plans[:5]), plans
    assert default["chat"] == default["stream"]  # the same plan, whichever way the answer is sent


def _made(make, timeout: float = 120):
    """What ``make()`` raised, run in a thread (a server that is not refused would serve there forever)."""
    import threading

    raised = []

    def run():
        try:
            make()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            raised.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert raised, "the server was made and runs: it was not refused"
    return raised[0]


def test_what_transformers_serve_cannot_serve_with_refreekv_is_refused_by_name(tmp_path):
    from transformers.cli.serve import Serve
    from transformers.cli.serving import utils

    from refreekv.adapters.transformers_serve import serve_caches, server_options

    own = _own_classes()
    # a server whose cache ReFreeKV cannot be: refused when it is made, not served uncompressed
    for option, message in (("continuous_batching", "continuous_batching: received True; expected False"),
                            ("compile", "compile: received True; expected False")):
        with serve_caches():
            err = _made(lambda: Serve(force_model=MODEL, port=_free_port(), device="cpu", **{option: True}))
        assert isinstance(err, ReFreeKVError) and message in str(err), err
        assert _own_classes() == own
    with pytest.raises(ReFreeKVError, match="replan: received 'history'; expected .* with prompt_cache_size=0"):
        with serve_caches(ReFreeKVConfig.evicting(replan="history"), prompt_cache_size=0):
            pass
    for size in (-1, 1.5, True):
        with pytest.raises(ReFreeKVError, match=f"prompt_cache_size: received {size!r}; expected an int >= 0"):
            with serve_caches(prompt_cache_size=size):
                pass
    with pytest.raises(ReFreeKVError, match="config: received type dict"):
        with serve_caches({"threshold": 0}):
            pass
    with serve_caches(), pytest.raises(ReFreeKVError, match="one serve_caches block at a time"):
        with serve_caches():
            pass
    assert _own_classes() == own
    with pytest.raises(ReFreeKVError, match="a server made inside a serve_caches block"):
        from refreekv.adapters.transformers_serve_engine import ReFreeKVModelLoader

        ReFreeKVModelLoader(device="cpu")
    # a transformers whose server lacks a class serve_caches needs: one error at switch-on, nothing patched
    saved = utils.GenerateRunner
    try:
        del utils.GenerateRunner
        with pytest.raises(ReFreeKVError, match=r"transformers: received version .* lacks utils.GenerateRunner\)"):
            with serve_caches():
                pass
    finally:
        utils.GenerateRunner = saved
    assert _own_classes() == own
    with pytest.raises(ReFreeKVError, match=r"transformers serve options: received '--port x'; expected its own "
                       r"options \(Invalid value for '--port'"):
        server_options(["--port", "x"])
    # a request whose generation config the cache cannot serve: HTTP 400 / an error event naming the setting
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    with running(tmp_path, {}) as (port, _):
        for setting, name in (({"cache_implementation": "static"}, "cache_implementation: "
                               "received 'static'"), ({"use_cache": False}, "use_cache: received False"),
                              ({"prefill_chunk_size": 16}, "prefill_chunk_size: received 16")):
            body = {"messages": messages, "generation_config": json.dumps({**setting, "max_new_tokens": 4})}
            status, text = _post(port, "chat/completions", body)
            assert status == 400 and name in json.loads(text)["detail"], text
            status, text = _post(port, "chat/completions", {**body, "stream": True})
            assert status == 200 and any(name in e for e in _streamed(text)[1]), text
        status, text = _post(port, "completions", {"prompt": "", "max_tokens": 4})  # the plain server: a bare 500
        assert status == 400 and "input_ids: received Tensor of shape (1, 0)" in json.loads(text)["detail"], text
        status, text = _post(port, "chat/completions", {"messages": messages, "max_tokens": 4, "temperature": 0})
        assert status == 200, text  # the server still serves after refusing


def test_refreekv_serve_engine_transformers_runs_the_server_and_shows_each_plan(tmp_path):
    """The CLI: `refreekv serve --engine transformers -- --port P` (the packaged model by default) serves,
    and prints one line per plan on stderr."""
    port = _free_port()
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "refreekv.cli", "serve", "--engine", "transformers", "--",
                             "--port", str(port), "--device", "cpu"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait(port, lambda: proc.poll() is None, lambda: log.read_text()[-3000:])
        status, text = _post(port, "chat/completions", {"messages": [{"role": "user", "content": needle_prompt(300, 0.3)}],
                                                        "temperature": 0, "max_tokens": 12})
        assert status == 200 and "741" in json.loads(text)["choices"][0]["message"]["content"], text
    finally:
        proc.terminate()
        proc.wait(30)
    lines = [x for x in log.read_text().splitlines() if x.startswith("refreekv: planned 30 layers at 428 tokens")]
    assert len(lines) == 1 and "budget 100.0%" not in lines[0], log.read_text()[-3000:]


def test_a_chat_through_transformers_serve_is_one_cache_that_follows_the_conversation(tmp_path):
    """Three turns of the conversation task, each request sending the whole chat: with replan="history"
    each turn continues the conversation's cache (only the new ids prefilled), the first prompt is kept
    whole (so the first answer is the plain server's), later plans compress what came before the turn, and
    the server holds less KV between requests than the full conversation."""
    from transformers import AutoTokenizer

    from refreekv.commands.conversation import conversations

    turns = conversations(AutoTokenizer.from_pretrained(MODEL), "test", 1)[0][:3]

    def chat(port):
        messages, answers = [], []
        for text, _ in turns:
            messages.append({"role": "user", "content": text})
            status, out = _post(port, "chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8})
            assert status == 200, out
            answer = json.loads(out)["choices"][0]
            assert answer["finish_reason"] == "length", answer  # 8 tokens: the held conversation's length below
            answers.append(answer["message"]["content"])
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    with running(tmp_path) as (port, _):
        plain = chat(port)
    with running(tmp_path, {"replan": "history"}) as (port, log):
        history = chat(port)
        text = log()
    holding = _lines(text, "refreekv: holding")
    assert len(holding) == 3 and all(x.startswith("refreekv: holding 1 conversation(s) for a next turn, KV ")
                                     for x in holding), holding  # one conversation, continued
    held = float(holding[-1].split("KV ")[1].removesuffix(" MB"))
    plans, lines = _plans(text), _lines(text, "refreekv: planned")
    assert len(plans) == 3 and plans[0][1] == 100.0 and all(b < 100 for _, b, _, _ in plans[1:]), lines
    assert all("from the prompt cache" in x for x in lines[1:]) and "from the prompt cache" not in lines[0]
    assert history[0] == plain[0]
    per_token = plans[0][2] / plans[0][0]  # MB a token holds: the first plan kept the whole first prompt
    full = per_token * (plans[-1][0] + 8 - 1)  # the conversation held (prompt, answer but its last token), uncompressed
    assert 0 < held < 0.9 * full


#: serve_caches in this process, its server in a thread: Serving's counters, read here, follow what the model's
#: process holds, and go back to 0 when the server unloads the idle model
COUNTERS = """
import json, logging, sys, threading, time, urllib.request
from transformers.cli.serve import Serve
from refreekv import ReFreeKVConfig
from refreekv.adapters.transformers_serve import serve_caches

model, port = sys.argv[1], int(sys.argv[2])
logging.getLogger("refreekv").setLevel(logging.INFO)  # the model's process logs its held conversations
def ask(messages):
    body = {"model": model, "temperature": 0, "max_tokens": 6, "messages": messages}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=300))["choices"][0]["message"]["content"]
seen = []
with serve_caches(ReFreeKVConfig.evicting(replan="history")) as serving:
    # no model on the command line: loaded at the first request, unloaded after 3 s without one
    threading.Thread(target=Serve, kwargs=dict(port=port, device="cpu", dtype="float32", model_timeout=3),
                     daemon=True).start()
    for _ in range(600):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").close()
            break
        except OSError:
            time.sleep(0.2)
    seen.append((serving.held_bytes, serving.held_conversations))
    for question in ("Name a colour.", "Name a fruit."):
        chat = [{"role": "user", "content": question}]
        chat.append({"role": "assistant", "content": ask(chat)})
        seen.append((serving.held_bytes, serving.held_conversations))
    chat.append({"role": "user", "content": "And another?"})
    ask(chat)
    seen.append((serving.held_bytes, serving.held_conversations))
    for _ in range(100):  # the idle model's process is stopped: its conversations leave the counters
        time.sleep(0.2)
        if serving.held_conversations == 0:
            break
    seen.append((serving.held_bytes, serving.held_conversations))
print(json.dumps(seen))
"""


def test_serving_counts_what_the_model_process_holds_and_takes_it_back_when_the_model_unloads():
    out = subprocess.run([sys.executable, "-c", COUNTERS, MODEL, str(_free_port())], capture_output=True, text=True,
                         timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [tuple(x) for x in json.loads(out.stdout.splitlines()[-1])]
    holding = [float(x.split("KV ")[1].removesuffix(" MB")) for x in _lines(out.stderr, "refreekv: holding")]
    assert [c for _, c in seen] == [0, 1, 2, 2, 0], (seen, out.stderr[-3000:])
    assert seen[0][0] == 0 and 0 < seen[1][0] < seen[2][0] and seen[-1][0] == 0, seen
    assert len(holding) == 3 and [round(b / 2**20, 2) for b, _ in seen[1:4]] == holding, (seen, holding)
