"""Running methods on the real model: answers, continuation metrics, and the method table.

A *method* is a name and a ``ReFreeKVConfig`` (None = full cache). The fixed-budget baselines
of the paper are the same machinery with another ranking and a fixed halting rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from refreekv import ReFreeKVConfig

BASELINE_BUDGETS = (0.9, 0.5, 0.2)


def methods(group: str) -> dict[str, ReFreeKVConfig | None]:
    """``main``: full, ReFreeKV, a threshold sweep and the fixed-budget baselines.
    ``ablations``: the paper's ablations around the default."""
    if group == "main":
        out: dict[str, ReFreeKVConfig | None] = {"full": None, "refreekv": ReFreeKVConfig()}
        for t in (0.001, 0.05, 0.1):
            out[f"refreekv T={t}"] = ReFreeKVConfig(threshold=t)
        for name, ranking in (("streamingllm", "position"), ("h2o", "h2o"), ("snapkv", "snapkv")):
            for b in BASELINE_BUDGETS:
                # Baselines compress every layer, so the nominal budget is the real one.
                out[f"{name} {b:.0%}"] = ReFreeKVConfig(ranking=ranking, halting="ratio", budget=b, retained_layers=())
        return out
    if group == "ablations":
        return {
            "refreekv": ReFreeKVConfig(),
            "k = 1% n": ReFreeKVConfig(query_rows=0.01),
            "k = 5% n": ReFreeKVConfig(query_rows=0.05),
            "rank by H2O attention": ReFreeKVConfig(ranking="h2o"),
            "rank by SnapKV attention": ReFreeKVConfig(ranking="snapkv"),
            "no retained layers": ReFreeKVConfig(retained_layers=()),
            "norm scope all": ReFreeKVConfig(norm_scope="all"),
        }
    if group == "quick":
        return {"full": None, "refreekv": ReFreeKVConfig(), "streamingllm 20%":
                ReFreeKVConfig(halting="ratio", budget=0.2, retained_layers=())}
    raise ValueError(group)


@dataclass
class Run:
    """One prompt through one method."""

    text: str
    budget: float = 1.0
    kv_bytes_full: int = 0
    kv_bytes: int = 0
    prefill_s: float = 0.0
    compress_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0


def _kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@torch.no_grad()
def answer(model, tok, prompt: str, config: ReFreeKVConfig | None, max_new_tokens: int = 16) -> Run:
    """Greedy answer to a chat prompt: prefill (timed), then decode (timed)."""
    from transformers import DynamicCache

    from refreekv.adapters.transformers import ReFreeKVCache, cache_kwarg, refreekv_hooks

    ids = tok([prompt], return_tensors="pt")
    cache = DynamicCache(config=model.config) if config is None else ReFreeKVCache(model, config)
    key = cache_kwarg(model)
    with refreekv_hooks(model):
        t = time.perf_counter()
        logits = model(**ids, **{key: cache}).logits[:, -1]
        prefill = time.perf_counter() - t
        held = _kv_bytes(cache)  # measured right after prefill (and compression)
        tokens, mask = [], ids["attention_mask"]
        t = time.perf_counter()
        nxt = logits.argmax(-1, keepdim=True)
        for _ in range(max_new_tokens):
            tokens.append(int(nxt))
            if int(nxt) == tok.eos_token_id:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(input_ids=nxt, attention_mask=mask, **{key: cache}).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    report = getattr(cache, "report", None)
    return Run(text=tok.decode(tokens, skip_special_tokens=True), budget=report.budget[0] if report else 1.0,
               kv_bytes_full=report.bytes_before if report else held, kv_bytes=held, prefill_s=prefill,
               compress_s=report.seconds if report else 0.0, decode_s=decode, new_tokens=len(tokens))


@torch.no_grad()
def continuation(model, context_ids: torch.Tensor, cont_ids: torch.Tensor, config: ReFreeKVConfig | None):
    """Teacher-forced logits of ``cont_ids`` after ``context_ids`` (compressed after the context's
    prefill when ``config`` is given). Returns (logits (T, V) float32, budget)."""
    from transformers import DynamicCache

    from refreekv.adapters.transformers import ReFreeKVCache, cache_kwarg, refreekv_hooks

    cache = DynamicCache(config=model.config) if config is None else ReFreeKVCache(model, config)
    key = cache_kwarg(model)
    n = context_ids.shape[1]
    with refreekv_hooks(model):
        first = model(input_ids=context_ids, **{key: cache}).logits[:, -1:]
        rest = model(input_ids=cont_ids[:, :-1], attention_mask=torch.ones(1, n + cont_ids.shape[1] - 1, dtype=torch.long),
                     **{key: cache}).logits
    logits = torch.cat([first, rest], dim=1)[0].float()
    return logits, (cache.report.budget[0] if config is not None else 1.0)


def continuation_metrics(full_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Perplexity of the targets, KL(full || method) per token, and top-1 agreement with full."""
    logp = torch.log_softmax(logits, -1)
    logp_full = torch.log_softmax(full_logits, -1)
    nll = -logp.gather(-1, targets[:, None]).mean()
    kl = (logp_full.exp() * (logp_full - logp)).sum(-1).mean()
    agree = (logits.argmax(-1) == full_logits.argmax(-1)).float().mean()
    return {"ppl": float(nll.exp()), "kl": float(kl), "top1_agreement": float(agree)}
