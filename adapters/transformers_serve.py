"""``transformers serve`` (transformers' OpenAI-compatible HTTP server) with ReFreeKV caches.

Its sequential path runs one ``model.generate`` per request on an inference thread (a
``GenerateManager`` per model) and keeps no cache between requests: every request sends the whole
conversation and gets a fresh cache. While ``serve_caches`` is on, that ``generate`` is
``refreekv.adapters.transformers.generate``: a fresh ``ReFreeKVCache`` planned after the request's
prompt, inside ``refreekv_hooks``, with that entry's checks (a request whose generation config asks for
a ``cache_implementation``, ``use_cache=False`` or a chunked prefill is refused with one error naming
the setting, not served uncompressed). Each plan is logged on the ``refreekv`` logger.

Continuous batching (``--continuous-batching``) keeps its own paged cache, which ReFreeKV does not
compress, and ``--compile`` asks for a static cache: with ``serve_caches`` on, a server made with either
is refused when it is made, never run uncompressed. A request the cache cannot serve gets HTTP 400 with
the error (non-streaming) or the server's own error event (streaming). Nothing here runs at import:
``serve_caches`` switches it on and puts transformers' own classes back on exit, errors included.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from refreekv.config import ReFreeKVConfig
from refreekv.errors import ReFreeKVError, bad_input
from refreekv.rules import REPLANS
from refreekv.validate import config_value

from .transformers import generate

log = logging.getLogger("refreekv")


class _Generating:
    """The model as a ``GenerateManager`` sees it, whose ``generate`` makes and plans a ReFreeKV cache
    (every other attribute is the model's)."""

    def __init__(self, model, config: ReFreeKVConfig):
        self._model, self._config = model, config

    def generate(self, **kwargs):
        out, cache = generate(self._model, self._config, **kwargs)
        rep = cache.history.report
        if rep.layers:
            log.info("refreekv: planned %d layers at %d tokens: budget %.1f%%, KV %.2f -> %.2f MB",
                     len(rep.layers), kwargs["input_ids"].shape[1], 100 * rep.budget[0],
                     rep.bytes_before / 2**20, rep.bytes_after / 2**20)
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


@contextmanager
def serve_caches(config: ReFreeKVConfig | None = None):
    """While the block runs, a ``transformers serve`` server (``transformers.cli.serve.Serve``) made in it
    serves every request with a fresh ReFreeKV cache (``config``; the library's default for None).
    ``replan`` must compress a first prompt ("turns", "chat" or "once"): each request is one prompt.
    A second switch-on while one is active is refused."""
    cfg = config_value(config)
    if REPLANS[cfg.replan].keeps_turn(1):
        raise bad_input("replan", repr(cfg.replan), '"turns", "chat" or "once" for transformers serve (each request '
                        f'is one prompt with a fresh cache; {cfg.replan!r} keeps the newest prompt whole, i.e. all of it)')
    from transformers.cli.serving import utils

    own, own_cb, own_state = utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState
    if getattr(own, "refreekv_config", None) is not None:
        raise bad_input("transformers serve", "ReFreeKV caches already on", "one serve_caches block at a time")

    class ReFreeKVGenerationState(own_state):
        """transformers serve's generation state, refusing the settings whose caches ReFreeKV cannot be."""

        def __init__(self, continuous_batching: bool = False, compile: bool = False, *args, **kwargs):
            if continuous_batching:
                raise bad_input("continuous_batching", "True", "False with ReFreeKV caches (continuous batching "
                                "keeps its own paged cache, which ReFreeKV does not compress)")
            if compile:
                raise bad_input("compile", "True", "False with ReFreeKV caches (--compile serves with a static "
                                "cache, which ReFreeKV does not compress)")
            super().__init__(continuous_batching, compile, *args, **kwargs)

    class ReFreeKVGenerateManager(own):
        """transformers' sequential ``GenerateManager``, generating with a fresh ReFreeKV cache per request."""

        refreekv_config = cfg

        def generate_streaming(self, model, *args, **kwargs):
            return super().generate_streaming(_Generating(model, cfg), *args, **kwargs)

        async def generate_non_streaming(self, model, *args, **kwargs):
            try:
                return await super().generate_non_streaming(_Generating(model, cfg), *args, **kwargs)
            except ReFreeKVError as err:  # the request's settings: the client's error, said to the client
                from fastapi import HTTPException

                raise HTTPException(status_code=400, detail=str(err)) from err

    class RefusedCBManager(own_cb):
        """Continuous batching with ReFreeKV on (a state made before the switch-on): refused at the
        request, never served uncompressed."""

        def __init__(self, *args, **kwargs):
            raise bad_input("continuous_batching", "True", "False with ReFreeKV caches (continuous batching keeps "
                            "its own paged cache, which ReFreeKV does not compress)")

    saved = utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState
    utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState = \
        ReFreeKVGenerateManager, RefusedCBManager, ReFreeKVGenerationState
    try:
        yield cfg
    finally:
        utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState = saved


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


def serve(argv: list[str] | None = None, config: ReFreeKVConfig | None = None) -> None:
    """Run ``transformers serve`` with ``argv`` (its own arguments and options: the model, ``--port``,
    ``--device``, ...) and a fresh ReFreeKV cache per request (``serve_caches``)."""
    import sys

    with serve_caches(config):
        _serve_command().main(list(sys.argv[1:] if argv is None else argv), prog_name="transformers serve")
