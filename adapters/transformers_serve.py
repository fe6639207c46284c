"""``transformers serve`` (transformers' OpenAI-compatible HTTP server) with ReFreeKV caches.

Since transformers 5.25 the server loads each model in a process of its own, and its sequential runner there
runs one ``model.generate`` per request; every request sends the whole conversation, and transformers keeps
no cache between requests. A server made while ``serve_caches`` is on loads its models wrapped so that this
``generate`` runs on a ReFreeKV cache inside ``refreekv_hooks`` (``continue_generate``, with ``generate``'s
checks: a request whose generation config asks for a ``cache_implementation``, ``use_cache=False`` or a
chunked prefill is refused with one error naming the setting, HTTP 400 or the stream's error event, not
served uncompressed): a fresh cache planned after the request's prompt, or, when the request's ids extend a
conversation the model's process holds (``PromptCaches``, the prompt cache mlx-lm's server has and
transformers' lacks), that conversation's cache, fed only the new ids and planned again as
``config.replan`` says. Each plan is logged on the ``refreekv`` logger, in the model's process, on stderr.

Continuous batching (``--continuous-batching``) keeps its own paged cache, which ReFreeKV does not
compress, and ``--compile`` asks for a static cache: with ``serve_caches`` on, a server made with either
is refused when it is made, never run uncompressed. Nothing here runs at import: ``serve_caches`` switches
it on (the classes the server is made with: ``transformers_serve_engine``) and puts transformers' own back
on exit, errors included; a server made inside the block keeps ReFreeKV caches for its whole life.
"""

from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from dataclasses import dataclass, field

from refreekv.config import ReFreeKVConfig
from refreekv.errors import bad_input
from refreekv.rules import REPLANS
from refreekv.validate import config_value

#: the transformers serve classes ``serve_caches`` replaces while it is on: (module, name)
_PATCHED = (("utils", "GenerationState"), ("model_manager", "GenerationState"), ("model_manager", "ModelLoader"))
_ACTIVE: list = []  # the Serving of the serve_caches block that is on, if one is


def _counter():
    """A 64-bit integer the model's processes (spawned) and this one share: passed to them as they start."""
    return multiprocessing.get_context("spawn").Value("q", 0)


@dataclass
class Serving:
    """What ``serve_caches`` yields: its configuration, its prompt cache size, and what the conversations the
    servers' model processes hold between requests keep (read from counters those processes update after
    each request, and take back from when the server stops them)."""

    config: ReFreeKVConfig
    prompt_cache_size: int
    counters: tuple = field(default_factory=lambda: (_counter(), _counter()), repr=False, compare=False)

    @property
    def held_bytes(self) -> int:
        """KV bytes the held conversations keep between requests, over all models."""
        return self.counters[0].value

    @property
    def held_conversations(self) -> int:
        """Conversations held for a next turn, over all models."""
        return self.counters[1].value


def active_serving() -> Serving:
    """The ``Serving`` of the ``serve_caches`` block that is on (a server's classes are made in one)."""
    if not _ACTIVE:
        raise bad_input("transformers serve", "a ReFreeKV server class made outside serve_caches",
                        "a server made inside a serve_caches block")
    return _ACTIVE[0]


@contextmanager
def serve_caches(config: ReFreeKVConfig | None = None, prompt_cache_size: int = 4):
    """While the block runs, a ``transformers serve`` server (``transformers.cli.serve.Serve``) made in it
    serves every request with a ReFreeKV cache (``config``; the library's default for None), for the
    server's whole life: a fresh one, or, when the request's token ids extend a conversation the model's
    process holds, that conversation's (up to ``prompt_cache_size`` held per model, ``PromptCaches``; 0
    holds none, and then ``replan`` must compress a first prompt: "turns", "chat" or "once"). Yields a
    ``Serving`` (``held_bytes``, ``held_conversations``). A second switch-on while one is on is refused.
    ``Serve(...)`` blocks while it serves, as without ReFreeKV: run it in a thread, or use ``serve``."""
    cfg = config_value(config)
    if isinstance(prompt_cache_size, bool) or not isinstance(prompt_cache_size, int) or prompt_cache_size < 0:
        raise bad_input("prompt_cache_size", repr(prompt_cache_size), "an int >= 0 (conversations held per model)")
    if REPLANS[cfg.replan].keeps_turn(1) and prompt_cache_size == 0:
        raise bad_input("replan", repr(cfg.replan), '"turns", "chat" or "once" with prompt_cache_size=0 (every request '
                        f'is then one prompt on a fresh cache, and {cfg.replan!r} keeps the newest prompt whole, i.e. '
                        'all of it)')
    modules = _serving_modules()
    if _ACTIVE:
        raise bad_input("transformers serve", "ReFreeKV caches already on", "one serve_caches block at a time")
    from . import transformers_serve_engine as engine

    ours = {"GenerationState": engine.ReFreeKVGenerationState, "ModelLoader": engine.ReFreeKVModelLoader}
    saved = [(modules[m], name, getattr(modules[m], name)) for m, name in _PATCHED]
    serving = Serving(cfg, prompt_cache_size)
    _ACTIVE.append(serving)
    try:
        for module, name, _ in saved:
            setattr(module, name, ours[name])
        yield serving
    finally:
        for module, name, own in saved:
            setattr(module, name, own)
        _ACTIVE.clear()


def _serving_modules() -> dict:
    """transformers serve's ``serving.utils`` and ``serving.model_manager``, which have the classes
    ``serve_caches`` replaces: one error naming the version when they are not there."""
    import transformers

    try:
        from transformers.cli.serving import model_manager, utils
    except ImportError as err:
        modules, missing = {}, f"its server ({err})"
    else:
        modules = {"utils": utils, "model_manager": model_manager}
        missing = ", ".join(f"{m}.{n}" for m, n in (*_PATCHED, ("model_manager", "EngineClient"),
                                                       ("utils", "GenerateRunner"))
                            if not isinstance(getattr(modules[m], n, None), type))
    if not modules or missing:
        raise bad_input("transformers", f"version {transformers.__version__} (transformers.cli.serving lacks {missing})",
                        "a transformers whose `transformers serve` loads each model in a process of its own "
                        "(EngineClient, ModelLoader, GenerationState, GenerateRunner: 5.25 was tested)")
    return modules


def refuse_settings(settings: dict) -> None:
    """One ``ReFreeKVError`` naming the first setting of transformers serve's parameters ``settings`` that
    serves with a cache ReFreeKV cannot be (continuous batching, ``--compile``)."""
    for name, why in REFUSED_SETTINGS.items():
        if settings.get(name):
            raise bad_input(name, repr(settings[name]), f"False with ReFreeKV caches ({why})")


#: transformers serve's settings that serve with a cache ReFreeKV cannot be: refused, never served uncompressed
REFUSED_SETTINGS = {"continuous_batching": "continuous batching keeps its own paged cache, which ReFreeKV does "
                                           "not compress",
                    "compile": "--compile serves with a static cache, which ReFreeKV does not compress"}


def _serve_command():
    """``transformers serve``'s click command (its options and arguments, as its CLI parses them)."""
    import typer
    from transformers.cli.serve import Serve

    app = typer.Typer()
    app.command(name="serve")(Serve)
    return typer.main.get_command(app)


def server_options(argv: list[str]) -> dict:
    """``transformers serve``'s parameters for the arguments ``argv``, as its own parser reads them (nothing
    runs); what that parser refuses is one ``ReFreeKVError`` with its message."""
    import typer

    try:
        ctx = _serve_command().make_context("transformers serve", list(argv))
    except typer.Exit as done:  # --help: the parser printed transformers serve's help
        raise SystemExit(done.exit_code) from None
    except typer.TyperException as err:
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise bad_input("transformers serve options", repr(" ".join(argv)), f"its own options ({message})") from None
    return dict(ctx.params)


def serve(argv: list[str] | None = None, config: ReFreeKVConfig | None = None, prompt_cache_size: int = 4) -> None:
    """Run ``transformers serve`` with ``argv`` (its own arguments and options: the model, ``--port``,
    ``--device``, ...) and ReFreeKV caches (``serve_caches``)."""
    import sys

    with serve_caches(config, prompt_cache_size):
        _serve_command().main(list(sys.argv[1:] if argv is None else argv), prog_name="transformers serve")
