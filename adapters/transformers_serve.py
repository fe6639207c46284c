"""``transformers serve`` (transformers' OpenAI-compatible HTTP server) with ReFreeKV caches.

Its sequential path runs one ``model.generate`` per request on an inference thread (a
``GenerateManager`` per model); every request sends the whole conversation, and transformers keeps no
cache between requests. While ``serve_caches`` is on, that ``generate`` runs on a ReFreeKV cache inside
``refreekv_hooks`` (``continue_generate``, with ``generate``'s checks: a request whose generation config
asks for a ``cache_implementation``, ``use_cache=False`` or a chunked prefill is refused with one error
naming the setting, not served uncompressed): a fresh cache planned after the request's prompt, or, when
the request's ids extend a conversation the server holds (``PromptCaches``, the prompt cache mlx-lm's
server has and transformers' lacks), that conversation's cache, fed only the new ids and planned again
as ``config.replan`` says. Each plan is logged on the ``refreekv`` logger.

Continuous batching (``--continuous-batching``) keeps its own paged cache, which ReFreeKV does not
compress, and ``--compile`` asks for a static cache: with ``serve_caches`` on, a server made with either
is refused when it is made, never run uncompressed. A request the cache cannot serve gets HTTP 400 with
the error (non-streaming) or the server's own error event (streaming). Nothing here runs at import:
``serve_caches`` switches it on and puts transformers' own classes back on exit, errors included.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from refreekv.config import ReFreeKVConfig
from refreekv.errors import ReFreeKVError, bad_input
from refreekv.rules import REPLANS
from refreekv.validate import config_value

from .transformers import ReFreeKVCache, cache_bytes, continue_generate

log = logging.getLogger("refreekv")

#: transformers serve's settings that serve with a cache ReFreeKV cannot be: refused, never served uncompressed
REFUSED_SETTINGS = {"continuous_batching": "continuous batching keeps its own paged cache, which ReFreeKV does "
                                           "not compress",
                    "compile": "--compile serves with a static cache, which ReFreeKV does not compress"}


def refuse_settings(settings: dict) -> None:
    """One ``ReFreeKVError`` naming the first setting of ``REFUSED_SETTINGS`` that ``settings`` (transformers
    serve's parameters, by name) switches on."""
    for name, why in REFUSED_SETTINGS.items():
        if settings.get(name):
            raise bad_input(name, repr(settings[name]), f"False with ReFreeKV caches ({why})")


class PromptCaches:
    """A server's conversations: up to ``size`` ReFreeKV caches, each with the token ids it holds (the
    request's prompt and answer but the answer's last token), least recently used first. A request whose
    ids extend a held conversation takes that cache out (one request per cache) and continues it: only the
    new ids are prefilled, and the new segment is planned as ``config.replan`` says (``"turns"``: over
    what was kept plus the new turn; evicted tokens stay evicted)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: list[tuple[torch.Tensor, ReFreeKVCache]] = []
        self._model = None  # a weak reference to the model the held caches were made with

    def _same_model(self, model) -> None:
        """Held caches are for one model object: a server that unloads an idle model and loads it again
        drops them (a cache of the old object would be refused by the new one's hooks)."""
        if self._model is None or self._model() is not model:
            self.entries.clear()
            self._model = weakref.ref(model)

    def take(self, ids: torch.Tensor, model) -> tuple[ReFreeKVCache | None, int]:
        """The cache of the longest held conversation of ``model`` that ``ids`` (n,) extends, taken out, and
        its length."""
        self._same_model(model)
        best = None
        for i, (held, _) in enumerate(self.entries):
            m = held.shape[0]
            if m < ids.shape[0] and bool((ids[:m] == held).all()) and (best is None or m > self.entries[best][0].shape[0]):
                best = i
        if best is None:
            return None, 0
        held, cache = self.entries.pop(best)
        return cache, held.shape[0]

    def put(self, ids: torch.Tensor, cache: ReFreeKVCache, model) -> None:
        """Hold ``cache`` of ``model``, which holds the conversation ``ids`` (n,)."""
        self._same_model(model)
        if self.size < 1:
            return
        self.entries.append((ids.clone(), cache))
        del self.entries[:-self.size]

    @property
    def nbytes(self) -> int:
        """KV bytes the held conversations keep between requests."""
        return sum(cache_bytes(c) for _, c in self.entries)


class _Generating:
    """The model as a ``GenerateManager`` sees it, whose ``generate`` runs on a ReFreeKV cache: a held
    conversation's that the request extends, or a fresh one (every other attribute is the model's)."""

    def __init__(self, model, config: ReFreeKVConfig, caches: PromptCaches):
        self._model, self._config, self._caches = model, config, caches

    def generate(self, **kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        reusable = isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and \
            (mask is None or bool(mask.all()))
        cache, reused = self._caches.take(ids[0], self._model) if reusable else (None, 0)
        if cache is None:
            cache = ReFreeKVCache(self._model, self._config)
        plans = len(cache.history.plans)
        out = continue_generate(self._model, cache, **kwargs)
        if len(cache.history.plans) > plans:
            rep = cache.history.report
            n = ids.shape[-1] if isinstance(ids, torch.Tensor) else cache.get_seq_length()
            log.info("refreekv: planned %d layers at %d tokens%s: budget %.1f%%, KV %.2f -> %.2f MB",
                     len(rep.layers), n, f" ({reused} from the prompt cache)" if reused else "",
                     100 * rep.budget[0], rep.bytes_before / 2**20, rep.bytes_after / 2**20)
        if reusable and out.shape[0] == 1 and cache.get_seq_length() == out.shape[1] - 1:
            self._caches.put(out[0, :-1], cache, self._model)
        if self._caches.size:
            log.info("refreekv: holding %d conversation(s) for a next turn, KV %.2f MB",
                     len(self._caches.entries), self._caches.nbytes / 2**20)
        return out

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass
class Serving:
    """What ``serve_caches`` yields: its configuration, and the prompt caches of the servers' models (one
    ``PromptCaches`` per model, made at its first request)."""

    config: ReFreeKVConfig
    prompt_cache_size: int
    prompt_caches: list[PromptCaches] = field(default_factory=list)

    @property
    def held_bytes(self) -> int:
        """KV bytes the held conversations keep between requests, over all models."""
        return sum(c.nbytes for c in self.prompt_caches)


@contextmanager
def serve_caches(config: ReFreeKVConfig | None = None, prompt_cache_size: int = 4):
    """While the block runs, a ``transformers serve`` server (``transformers.cli.serve.Serve``) made in it
    serves every request with a ReFreeKV cache (``config``; the library's default for None): a fresh one,
    or, when the request's token ids extend a conversation the server holds, that conversation's (up to
    ``prompt_cache_size`` held per model, ``PromptCaches``; 0 holds none, and then ``replan`` must compress a
    first prompt: "turns", "chat" or "once"). Yields a ``Serving`` (``held_bytes``: what the held
    conversations keep). A second switch-on while one is active is refused."""
    cfg = config_value(config)
    if isinstance(prompt_cache_size, bool) or not isinstance(prompt_cache_size, int) or prompt_cache_size < 0:
        raise bad_input("prompt_cache_size", repr(prompt_cache_size), "an int >= 0 (conversations held per model)")
    if REPLANS[cfg.replan].keeps_turn(1) and prompt_cache_size == 0:
        raise bad_input("replan", repr(cfg.replan), '"turns", "chat" or "once" with prompt_cache_size=0 (every request '
                        f'is then one prompt on a fresh cache, and {cfg.replan!r} keeps the newest prompt whole, i.e. '
                        'all of it)')
    utils = _serving_module()
    own, own_cb, own_state = utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState
    if getattr(own, "refreekv_config", None) is not None:
        raise bad_input("transformers serve", "ReFreeKV caches already on", "one serve_caches block at a time")

    class ReFreeKVGenerationState(own_state):
        """transformers serve's generation state, refusing the settings whose caches ReFreeKV cannot be."""

        def __init__(self, continuous_batching: bool = False, compile: bool = False, *args, **kwargs):
            refuse_settings({"continuous_batching": continuous_batching, "compile": compile})
            super().__init__(continuous_batching, compile, *args, **kwargs)

    class ReFreeKVGenerateManager(own):
        """transformers' sequential ``GenerateManager``, generating on ReFreeKV caches (a held conversation's
        when the request extends one, else a fresh one)."""

        refreekv_config = cfg

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prompt_caches = PromptCaches(prompt_cache_size)  # one manager per model: its conversations
            serving.prompt_caches.append(self.prompt_caches)

        def generate_streaming(self, model, *args, **kwargs):
            return super().generate_streaming(_Generating(model, cfg, self.prompt_caches), *args, **kwargs)

        async def generate_non_streaming(self, model, *args, **kwargs):
            try:
                return await super().generate_non_streaming(_Generating(model, cfg, self.prompt_caches), *args,
                                                            **kwargs)
            except ReFreeKVError as err:  # the request's settings: the client's error, said to the client
                from fastapi import HTTPException

                raise HTTPException(status_code=400, detail=str(err)) from err

    class RefusedCBManager(own_cb):
        """Continuous batching with ReFreeKV on (a state made before the switch-on): refused at the
        request, never served uncompressed."""

        def __init__(self, *args, **kwargs):
            refuse_settings({"continuous_batching": True})

    serving = Serving(cfg, prompt_cache_size)
    saved = utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState
    utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState = \
        ReFreeKVGenerateManager, RefusedCBManager, ReFreeKVGenerationState
    try:
        yield serving
    finally:
        utils.GenerateManager, utils.CBGenerateManager, utils.GenerationState = saved


_PATCHED = ("GenerateManager", "CBGenerateManager", "GenerationState")


def _serving_module():
    """transformers serve's ``serving.utils`` module, which has the classes ``serve_caches`` replaces."""
    import transformers

    try:
        from transformers.cli.serving import utils
    except ImportError as err:
        utils, missing = None, str(err)
    else:
        missing = ", ".join(n for n in _PATCHED if not isinstance(getattr(utils, n, None), type))
    if utils is None or missing:
        raise bad_input("transformers", f"version {transformers.__version__} (its transformers.cli.serving.utils "
                        f"lacks {missing})", "a transformers whose `transformers serve` has the sequential "
                        "GenerateManager, CBGenerateManager and GenerationState (5.24 was tested)")
    return utils


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
