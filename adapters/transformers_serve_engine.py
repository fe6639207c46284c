"""The model's side of ``transformers serve`` with ReFreeKV caches (``transformers_serve.serve_caches``).

Since transformers 5.25, ``transformers serve`` loads each model in a process of its own (spawned), and the
HTTP server sends it the requests. What that process runs comes to it pickled: the server's ``ModelLoader``
(how the model loads) and its ``GenerationState`` (how it generates). ``serve_caches`` makes the server with
the two classes below, so the model's process loads the model wrapped in ``Generating``, whose ``generate``
runs on a ReFreeKV cache, and the settings ReFreeKV cannot serve are refused when the server is made. This
module imports transformers' server: it is imported by ``serve_caches``, and by the model's process when it
unpickles its loader, never by ``import refreekv``.
"""

from __future__ import annotations

import logging
import signal
import sys

import torch
from transformers.cli.serving.model_manager import ModelLoader
from transformers.cli.serving.utils import GenerationState

from refreekv.config import ReFreeKVConfig

from .transformers import ReFreeKVCache, cache_bytes, continue_generate
from .transformers_serve import active_serving, refuse_settings

log = logging.getLogger("refreekv")

class PromptCaches:
    """A model's conversations: up to ``size`` ReFreeKV caches, each with the token ids it holds (the
    request's prompt and answer but the answer's last token), least recently used first. A request whose
    ids extend a held conversation takes that cache out (one request per cache) and continues it: only the
    new ids are prefilled, and the new segment is planned as ``config.replan`` says (``"turns"``: over
    what was kept plus the new turn; evicted tokens stay evicted)."""

    def __init__(self, size: int):
        self.size = size
        self.entries: list[tuple[torch.Tensor, ReFreeKVCache]] = []
        self._model = None  # a weak reference to the model the held caches were made with

    def _same_model(self, model) -> None:
        """Held caches are for one model object: caches of another are dropped (its hooks would refuse them)."""
        import weakref

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


class Generating:
    """The model as transformers serve's runner sees it, whose ``generate`` runs on a ReFreeKV cache: a held
    conversation's that the request extends, or a fresh one (every other attribute is the model's). After
    each request it adds what its held conversations changed by to ``shared`` (the server's ``Serving``
    counters: bytes, conversations), so the serving process can read them."""

    def __init__(self, model, config: ReFreeKVConfig, caches: PromptCaches, shared: tuple):
        self._model, self._config, self._caches, self._shared = model, config, caches, shared
        self._reported = (0, 0)  # what this process added to the shared counters

    def generate(self, **kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        reusable = isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and \
            (mask is None or bool(mask.all()))
        cache, reused = self._caches.take(ids[0], self._model) if reusable else (None, 0)
        try:
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
            return out
        finally:  # a refused or cancelled request's taken cache is gone: the counters say so too
            self.report()
            if self._caches.size:
                log.info("refreekv: holding %d conversation(s) for a next turn, KV %.2f MB",
                         len(self._caches.entries), self._caches.nbytes / 2**20)

    def report(self, held: tuple[int, int] | None = None) -> None:
        """Add to the shared counters what changed since the last report (to ``held``, bytes and
        conversations; by default what the prompt caches hold now)."""
        held = (self._caches.nbytes, len(self._caches.entries)) if held is None else held
        for counter, now, before in zip(self._shared, held, self._reported):
            with counter.get_lock():
                counter.value += now - before
        self._reported = held

    def __getattr__(self, name):
        return getattr(self._model, name)


class ReFreeKVGenerationState(GenerationState):
    """transformers serve's generation state, refusing the settings whose caches ReFreeKV cannot be."""

    def __init__(self, continuous_batching: bool = False, compile: bool = False, *args, **kwargs):
        refuse_settings({"continuous_batching": continuous_batching, "compile": compile})
        super().__init__(continuous_batching, compile, *args, **kwargs)


class ReFreeKVModelLoader(ModelLoader):
    """transformers serve's model loader, whose models generate on ReFreeKV caches (``Generating``). Made
    in the serving process while ``serve_caches`` is on, it takes that block's configuration, prompt cache
    size, shared counters and ``refreekv`` log level with it to each model's process (pickled)."""

    def __init__(self, *args, **kwargs):
        serving = active_serving()
        self.refreekv_config, self.prompt_cache_size = serving.config, serving.prompt_cache_size
        self.refreekv_shared = serving.counters
        self.refreekv_log_level = log.getEffectiveLevel()
        super().__init__(*args, **kwargs)

    def load_model_and_processor(self, model_id: str, on_progress=None):
        model, processor = super().load_model_and_processor(model_id, on_progress=on_progress)
        if log.level == logging.NOTSET:
            log.setLevel(self.refreekv_log_level)
        if not log.handlers:  # this process's plans go where the server's own log goes: stderr
            shown = logging.StreamHandler(sys.stderr)
            shown.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(shown)
        generating = Generating(model, self.refreekv_config, PromptCaches(self.prompt_cache_size),
                                self.refreekv_shared)
        _take_back_on_stop(generating)
        return generating, processor


def _take_back_on_stop(generating: Generating) -> None:
    """When the server stops this model's process (SIGTERM: an idle model unloaded, the server shut down),
    the conversations it held leave the shared counters before it exits."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers are the main thread's (transformers loads in it; a caller that does not: no handler)

    def stop(signum, frame):
        generating.report((0, 0))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
