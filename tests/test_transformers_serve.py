"""transformers serve (transformers' OpenAI-compatible HTTP server) with ReFreeKV caches: each request
is served with a fresh ReFreeKVCache planned after its prompt; at T = 0 every answer is the plain
server's; what the cache cannot serve is refused by name, never served uncompressed."""

from __future__ import annotations

import json
import logging
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


@contextmanager
def running(**options):
    """A transformers serve server in this process (in a thread), pinned to the packaged model."""
    from transformers.cli.serve import Serve

    port = _free_port()
    srv = Serve(force_model=MODEL, port=port, non_blocking=True, device="cpu", dtype="float32", **options)
    try:
        _wait(port)
        yield port
    finally:
        srv.kill_server()


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


def _plans(caplog) -> list[tuple[int, float, float, float]]:
    """(tokens, budget %, MB before, MB after) of each logged plan."""
    rows = []
    for rec in caplog.records:
        msg = rec.getMessage()
        if rec.name == "refreekv" and msg.startswith("refreekv: planned"):
            tokens = int(msg.split(" at ")[1].split(" tokens")[0])
            budget = float(msg.split("budget ")[1].split("%")[0])
            before, after = (float(x) for x in msg.split("KV ")[1].removesuffix(" MB").split(" -> "))
            rows.append((tokens, budget, before, after))
    return rows


def test_prompt_caches_continue_the_longest_conversation_a_request_extends():
    import copy

    import torch

    from refreekv.adapters.transformers import ReFreeKVCache
    from refreekv.adapters.transformers_serve import PromptCaches
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


def test_transformers_serve_answers_as_the_plain_server_at_T0_and_compresses_each_request(caplog):
    from transformers.cli.serving import utils

    from refreekv.adapters.transformers_serve import serve_caches

    own = (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState)
    caplog.set_level(logging.INFO, logger="refreekv")
    with running() as port:
        plain = _answers(port)
    assert plain["chat"] == plain["stream"] and "741" in plain["chat"]
    assert _plans(caplog) == []  # a plain server plans nothing
    with serve_caches(ReFreeKVConfig(threshold=0)), running() as port:
        exact = _answers(port)
    assert exact == plain
    plans = _plans(caplog)
    assert len(plans) == 6 and all(b == 100.0 and before == after for _, b, before, after in plans)
    assert plans[0][0] == plans[1][0] < plans[2][0]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refreekv: planned")]
    # the second turn and the branch continued a first turn's cache; the edited conversation did not
    assert ["from the prompt cache" in x for x in lines] == [False, False, True, False, True, False], lines
    caplog.clear()
    with serve_caches(ReFreeKVConfig(threshold=0), prompt_cache_size=0), running() as port:
        assert _answers(port) == plain  # a fresh cache for each request
    assert len(_plans(caplog)) == 6 and not any("from the prompt cache" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with serve_caches() as serving, running() as port:
        default = _answers(port)
    assert serving.config == ReFreeKVConfig() and serving.prompt_cache_size == 4 and serving.held_bytes > 0
    plans = _plans(caplog)
    assert len(plans) == 6 and all(b < 100 and after < before for _, b, before, after in plans[:5]), plans
    assert default["chat"] == default["stream"]  # the same plan, whichever way the answer is sent
    assert (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState) == own  # switched off cleanly


def test_what_transformers_serve_cannot_serve_with_refreekv_is_refused_by_name():
    from transformers.cli.serve import Serve
    from transformers.cli.serving import utils

    from refreekv.adapters.transformers_serve import serve_caches, server_options

    own = (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState)
    # a server whose cache ReFreeKV cannot be: refused when it is made, not served uncompressed
    for option, message in (("continuous_batching", "continuous_batching: received True; expected False"),
                            ("compile", "compile: received True; expected False")):
        with serve_caches(), pytest.raises(ReFreeKVError, match=message):
            server = Serve(force_model=MODEL, port=_free_port(), non_blocking=True, device="cpu", **{option: True})
            server.kill_server()  # reached only when not refused: stop it, or its thread would keep pytest alive
        assert (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState) == own
    with pytest.raises(ReFreeKVError, match="replan: received 'history'; expected .* with prompt_cache_size=0"):
        with serve_caches(ReFreeKVConfig(replan="history"), prompt_cache_size=0):
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
    assert (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState) == own
    # a transformers whose server lacks a class serve_caches replaces: one error at switch-on, nothing patched
    saved = utils.GenerationState
    try:
        del utils.GenerationState
        with pytest.raises(ReFreeKVError, match=r"transformers: received version .* lacks GenerationState\)"):
            with serve_caches():
                pass
    finally:
        utils.GenerationState = saved
    assert (utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState) == own
    with pytest.raises(ReFreeKVError, match=r"transformers serve options: received '--port x'; expected its own "
                       r"options \(Invalid value for '--port'"):
        server_options(["--port", "x"])
    # a request whose generation config the cache cannot serve: HTTP 400 / an error event naming the setting
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    with serve_caches(), running() as port:
        for setting, name in (({"cache_implementation": "static"}, "generation_config.cache_implementation: "
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


def test_a_chat_through_transformers_serve_is_one_cache_that_follows_the_conversation(caplog):
    """Three turns of the conversation task, each request sending the whole chat: with replan="history"
    each turn continues the conversation's cache (only the new ids prefilled), the first prompt is kept
    whole (so the first answer is the plain server's), later plans compress what came before the turn, and
    the server holds less KV between requests than the full conversation."""
    from transformers import AutoTokenizer

    from refreekv.adapters.transformers_serve import serve_caches
    from refreekv.commands.conversation import conversations

    turns = conversations(AutoTokenizer.from_pretrained(MODEL), "test", 1)[0][:3]

    def chat(port):
        messages, answers = [], []
        for text, _ in turns:
            messages.append({"role": "user", "content": text})
            status, out = _post(port, "chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 8})
            assert status == 200, out
            answers.append(json.loads(out)["choices"][0]["message"]["content"])
            messages.append({"role": "assistant", "content": answers[-1]})
        return answers

    with running() as port:
        plain = chat(port)
    caplog.set_level(logging.INFO, logger="refreekv")
    with serve_caches(ReFreeKVConfig(replan="history")) as serving, running() as port:
        history = chat(port)
    held = serving.held_bytes
    assert len(serving.prompt_caches) == 1 and len(serving.prompt_caches[0].entries) == 1  # one conversation
    holding = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refreekv: holding")]
    assert len(holding) == 3 and holding[-1] == f"refreekv: holding 1 conversation(s) for a next turn, KV {held / 2**20:.2f} MB"
    plans = _plans(caplog)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refreekv: planned")]
    assert len(plans) == 3 and plans[0][1] == 100.0 and all(b < 100 for _, b, _, _ in plans[1:]), lines
    assert all("from the prompt cache" in x for x in lines[1:]) and "from the prompt cache" not in lines[0]
    assert history[0] == plain[0]
    per_token = plans[0][2] / plans[0][0]  # MB a token holds: the first plan kept the whole first prompt
    full = per_token * serving.prompt_caches[0].entries[0][0].shape[0] * 2**20  # the conversation, uncompressed
    assert 0 < held < 0.9 * full

