"""ReFreeKV in HF transformers generate, on the real SmolLM2-135M-Instruct (and tiny random
Qwen2 / Mistral / Gemma-3 models for the other architectures)."""

import contextlib
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache, GenerationConfig

from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv import reference as R
from refreekv.adapters.transformers import (TAIL_FIELDS, ReFreeKVCache, attention_modules, capture_prefill, generate,
                                           refreekv_hooks)
from refreekv.commands.models import load_torch
from refreekv.commands.prompts import chat, needle_prompt
from refreekv.testing import valid_cut_range

pytestmark = pytest.mark.model
GREEDY = {"do_sample": False, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def smol():
    return load_torch()


@pytest.fixture(scope="module")
def prompt(smol):
    _, tok = smol
    return tok([chat(tok, needle_prompt(900, depth=0.4))], return_tensors="pt")


def full_generate(model, inputs, **kw):
    return model.generate(**inputs, **GREEDY, **kw)


@torch.no_grad()
def test_zero_threshold_gives_full_cache_output(smol, prompt):
    model, _ = smol
    full = full_generate(model, prompt, output_scores=True, return_dict_in_generate=True)
    out, cache = generate(model, ReFreeKVConfig(threshold=0.0), **prompt, **GREEDY,
                          output_scores=True, return_dict_in_generate=True)
    assert out.sequences.tolist() == full.sequences.tolist()
    # T = 0 is the full cache: every layer keeps every token, even those whose attention from the
    # prompt's last queries is 0 in float32 (0.2 % of this cache; they went before T = 0 was special)
    n = prompt["input_ids"].shape[1]
    assert [r.kept for r in cache.report.layers] == [[n]] * model.config.num_hidden_layers
    assert out.scores[0].equal(full.scores[0])  # the prefill itself is untouched
    for a, b in zip(out.scores, full.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def _capture_queries_and_keys(model, inputs, rows=1):
    """A plain full-cache prefill; the newest ``rows`` queries from q_proj's output, RoPE applied with
    the model's own rotary embedding at their positions (no refreekv code); K from the DynamicCache."""
    q_out = {}
    hooks = [m.q_proj.register_forward_hook(lambda mod, a, o, i=m.layer_idx: q_out.__setitem__(i, o[:, -rows:]))
             for m in attention_modules(model)]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, cache=cache)
    for h in hooks:
        h.remove()
    n = inputs["input_ids"].shape[1]
    cos, sin = model.model.rotary_emb(q_out[0], torch.arange(n - rows, n)[None])
    out = []
    for m in attention_modules(model):
        q = q_out[m.layer_idx].view(1, rows, -1, m.head_dim).transpose(1, 2)
        q = q * cos[:, None] + torch.cat([-q[..., m.head_dim // 2:], q[..., :m.head_dim // 2]], -1) * sin[:, None]
        out.append((q.double().numpy(), cache.layers[m.layer_idx].keys.double().numpy()))
    return out


@pytest.mark.parametrize("cfg", [ReFreeKVConfig(), ReFreeKVConfig.evicting(), ReFreeKVConfig.paper()],
                         ids=["default", "evicting", "paper"])
@torch.no_grad()
def test_the_cache_shrinks_to_the_reference_budget(smol, prompt, cfg):
    model, _ = smol
    cache = ReFreeKVCache(model, cfg)
    with refreekv_hooks(model):
        model(**prompt, cache=cache)  # prefill only
    n = prompt["input_ids"].shape[1]
    captured = _capture_queries_and_keys(model, prompt, cfg.rows_needed(n))
    assert len(cache.report.layers) == len(captured) == 30  # every layer, once, in layer order
    for i, ((q, K), rep, layer) in enumerate(zip(captured, cache.report.layers, cache.layers)):
        assert rep.layer == i
        held = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values,
                                                          *(getattr(layer, f) for f in TAIL_FIELDS)) if t is not None)
        assert rep.bytes_after == held and layer.keys.shape[-2] == rep.kept[0]
        # with a tail, exactly what the rule evicted is held at tail_bits; without one, nothing of it
        assert layer.tail_slots == (0 if cfg.tail_bits is None else n - rep.kept[0])
        if i in cfg.retained_layers:
            assert not rep.compressed and rep.kept == [n]
            continue
        want = R.plan_layer(q, K, cfg)
        lo, hi = valid_cut_range(want["ratio"][0], cfg.threshold, 2e-4, cfg.sinks, n)
        assert lo <= rep.kept[0] <= hi, (i, rep.kept, lo, hi)
        tail = 0 if cfg.tail_bits is None or rep.kept[0] == n else \
            R.tail_bytes(1, K.shape[1], n - rep.kept[0], K.shape[-1], cfg.tail_bits, 4)
        assert rep.bytes_after == R.kv_bytes(1, K.shape[1], rep.kept[0], K.shape[-1], 4) + tail
    assert cache.report.bytes_after < 0.9 * cache.report.bytes_before
    assert math.isclose(cache.report.budget[0], np.mean([r.kept[0] / n for r in cache.report.layers]))


@torch.no_grad()
def test_layers_planned_in_small_groups_give_the_same_cache(smol, prompt, monkeypatch):
    """The CPU cap on jointly planned layers (CPU_JOINT_BYTES) changes speed, never the cache."""
    import refreekv.adapters.transformers as T

    model, _ = smol
    caches = []
    for cap in (T.CPU_JOINT_BYTES, 1):  # all layers in one group, then one layer per group
        monkeypatch.setattr(T, "CPU_JOINT_BYTES", cap)
        cache = ReFreeKVCache(model)
        with refreekv_hooks(model):
            model(**prompt, cache=cache)
        caches.append(cache)
    one, each = caches
    assert [r.kept for r in one.report.layers] == [r.kept for r in each.report.layers]
    assert any(r.compressed for r in one.report.layers)
    for a, b in zip(one.layers, each.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@torch.no_grad()
def test_left_padded_batch_matches_each_sample_alone(smol):
    model, tok = smol
    tok.padding_side = "left"
    texts = [chat(tok, needle_prompt(600, depth=0.3)), chat(tok, "Name three colours of the rainbow.")]
    batch = tok(texts, return_tensors="pt", padding=True)
    out_b, cache_b = generate(model, ReFreeKVConfig(), **batch, **GREEDY)
    for i, text in enumerate(texts):
        one = tok([text], return_tensors="pt")
        out_1, cache_1 = generate(model, ReFreeKVConfig(), **one, **GREEDY)
        gen_1 = out_1[0, one["input_ids"].shape[1]:].tolist()
        assert out_b[i, batch["input_ids"].shape[1]:].tolist()[:len(gen_1)] == gen_1
        # Padded SDPA rounds differently from the sample alone (~1e-7): a cut may move by the
        # tokens whose norm ratio lies within that noise of T, never further.
        got = np.array([r.kept[i] for r in cache_b.report.layers])
        want = np.array([r.kept[0] for r in cache_1.report.layers])
        assert (got == want).mean() > 0.9 and np.abs(got - want).max() <= 2, (got, want)


@torch.no_grad()
def test_decode_attends_to_kept_positions_at_true_positions(smol, prompt):
    model, _ = smol
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.05))
    n = prompt["input_ids"].shape[1]
    with refreekv_hooks(model):
        logits = model(**prompt, cache=cache).logits
    layer_idx = max(range(2, len(cache.layers)), key=lambda i: n - cache.layers[i].keys.shape[-2])
    module = attention_modules(model)[layer_idx]
    seen = {}
    hook = module.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out[0]), with_kwargs=True)
    nxt = logits[:, -1:].argmax(-1)
    with refreekv_hooks(model):
        model(input_ids=nxt, attention_mask=torch.ones(1, n + 1, dtype=torch.long), cache=cache)
    hook.remove()
    assert seen["kw"]["position_ids"].tolist() == [[n]]  # RoPE continues from n, not from the kept count
    # By hand: the new token's query against the layer's kept K/V (plus its own), softmax, o_proj.
    h, (cos, sin) = seen["kw"]["hidden_states"], seen["kw"]["position_embeddings"]
    q = module.q_proj(h).view(1, 1, -1, module.head_dim).transpose(1, 2)
    half = module.head_dim // 2
    q = q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[:, None]
    K, V = cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    g = q.shape[1] // K.shape[1]
    w = torch.softmax(q @ K.repeat_interleave(g, 1).transpose(-1, -2) * module.scaling, -1)
    manual = module.o_proj((w @ V.repeat_interleave(g, 1)).transpose(1, 2).reshape(1, 1, -1))
    assert K.shape[-2] < n + 1
    torch.testing.assert_close(seen["out"], manual, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_compress_context_once_then_answer_several_questions(smol):
    model, tok = smol
    context = needle_prompt(700, depth=0.5, question=False)
    ctx = tok([chat(tok, context, open_turn=True)], return_tensors="pt")
    questions = ["What is the magic number mentioned in the text?", "Who wrote the essay?"]
    for T in (0.0, 0.01):
        cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=T))
        with refreekv_hooks(model):
            model(**ctx, cache=cache)
        held = [layer.keys.shape[-2] for layer in cache.layers]
        for question in questions:
            ids = tok([chat(tok, context, open_turn=True) + " " + question + "<|im_end|>\n<|im_start|>assistant\n"],
                      return_tensors="pt")
            assert ids["input_ids"][0, :ctx["input_ids"].shape[1]].tolist() == ctx["input_ids"][0].tolist()
            with refreekv_hooks(model):
                out = model.generate(**ids, cache=copy.deepcopy(cache), **GREEDY)
            if T == 0.0:
                assert out.tolist() == full_generate(model, ids).tolist()
        assert [layer.keys.shape[-2] for layer in cache.layers] == held  # the shared context is untouched
        assert len(cache.report.layers) == model.config.num_hidden_layers
    assert sum(held) < 0.9 * len(held) * ctx["input_ids"].shape[1]


@torch.no_grad()
def test_a_deep_copy_mid_generation_shares_the_model_not_its_weights(smol, prompt):
    """With replan_every, the cache holds the newest generated rows and the attention modules they came
    from: a copy shares those modules (copying them would copy the model's attention weights into every
    fork) and continues exactly as the original."""
    model, tok = smol
    out, cache = generate(model, ReFreeKVConfig.evicting(threshold=0.05, replan_every=8), **prompt, max_new_tokens=12, do_sample=False)
    buffered = [e[0] for b in cache._generated.values() for e in b]
    assert buffered  # 12 tokens, a plan after 8: rows of the newest 4 are waiting
    fork = copy.deepcopy(cache)
    shared = [e[0] for b in fork._generated.values() for e in b]
    assert len(shared) == len(buffered) and all(a is b for a, b in zip(shared, buffered))
    assert fork.layers[5].keys is not cache.layers[5].keys and torch.equal(fork.layers[5].keys, cache.layers[5].keys)
    turn = tok(["<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")["input_ids"]
    full = torch.cat([out, turn], 1)
    with refreekv_hooks(model):
        a = model.generate(input_ids=full, attention_mask=torch.ones_like(full), cache=fork, **GREEDY)
        b = model.generate(input_ids=full, attention_mask=torch.ones_like(full), cache=cache, **GREEDY)
    assert torch.equal(a, b)


@torch.no_grad()
def _second_step_logits(model, prompt, cache, hooks: bool) -> torch.Tensor:
    """Logits of the first decode step after a prefill into ``cache`` (float32 copy)."""
    n = prompt["input_ids"].shape[1]
    with refreekv_hooks(model) if hooks else contextlib.nullcontext():
        nxt = model(**prompt, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, attention_mask=torch.ones(1, n + 1, dtype=torch.long), cache=cache)
    return out.logits[:, -1].float()


def test_eager_attention_and_bfloat16(smol, prompt):
    # float32, eager attention: T = 0 gives the full cache's tokens exactly.
    model, _ = load_torch("float32", "eager")
    full = full_generate(model, prompt)
    out, cache = generate(model, ReFreeKVConfig(threshold=0.0), **prompt, **GREEDY)
    assert out.tolist() == full.tolist()
    # bfloat16: T = 0 evicts the positions whose scores are exactly 0, and attention over fewer keys
    # rounds differently. On this prompt the second step's top two logits are one bfloat16 step
    # apart, so SDPA against eager attention flips the greedy token on rounding alone. T = 0 must be
    # no farther from the full cache than the two attention kernels are from each other.
    model, _ = load_torch("bfloat16", "sdpa")
    full = _second_step_logits(model, prompt, DynamicCache(config=model.config), False)
    ours = _second_step_logits(model, prompt, ReFreeKVCache(model, ReFreeKVConfig(threshold=0.0)), True)
    model.config._attn_implementation = "eager"
    eager = _second_step_logits(model, prompt, DynamicCache(config=model.config), False)
    model.config._attn_implementation = "sdpa"
    assert (ours - full).abs().max() <= (eager - full).abs().max()
    for dtype, impl in (("float32", "eager"), ("bfloat16", "sdpa")):
        model, _ = load_torch(dtype, impl)
        out, cache = generate(model, ReFreeKVConfig(), **prompt, **GREEDY)
        assert cache.report.bytes_after < cache.report.bytes_before
        assert cache.layers[5].keys.dtype == getattr(torch, dtype)


def test_bad_configurations_fail_before_any_work(smol):
    model, tok = smol
    with pytest.raises(ReFreeKVError, match="retained_layers: received \\(0, 1, 30\\)"):
        ReFreeKVCache(model, ReFreeKVConfig.evicting(retained_layers=(0, 1, 30)))
    with pytest.raises(ReFreeKVError, match="sinks: received 9000"):
        ReFreeKVCache(model, ReFreeKVConfig.evicting(sinks=9000))
    with pytest.raises(ReFreeKVError, match="config: received type dict"):
        ReFreeKVCache(model, {"threshold": 0.1})
    impl = model.config._attn_implementation
    model.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(ReFreeKVError, match="model: received attn_implementation 'flex_attention'"):
            ReFreeKVCache(model)
    finally:
        model.config._attn_implementation = impl
    tok.padding_side = "right"
    batch = tok([chat(tok, "Hi"), chat(tok, "Tell me about the moon and the sun.")], return_tensors="pt", padding=True)
    tok.padding_side = "left"
    with pytest.raises(ReFreeKVError, match="attention_mask: received padding that is not on the left"):
        generate(model, ReFreeKVConfig(), **batch, **GREEDY)
    ids = batch["input_ids"]
    for call, message in (
            (lambda: ReFreeKVCache(None), "model: received type NoneType"),
            (lambda: capture_prefill(model, ids.float()), "input_ids: received Tensor of shape .* dtype torch.float32"),
            (lambda: capture_prefill(model, ids[:1], ids[:1, :3]), "attention_mask: received Tensor of shape"),
            (lambda: capture_prefill(model, ids[:1], rows=0), "rows: received 0"),
            (lambda: generate(model, None, input_ids=ids[:1], past_key_values=ReFreeKVCache(model)),
             "past_key_values: received a ReFreeKVCache"),
            (lambda: generate(model, None, input_ids=ids[:1].float()), "input_ids: received"),
            (lambda: generate(model, None, input_ids=ids[:1].tolist()), "input_ids: received type list"),
            (lambda: generate(model, None, input_ids=ids, attention_mask=torch.cat(
                [torch.ones_like(ids[:1]), torch.zeros_like(ids[:1])])), r"attention_mask: received no token in sample\(s\) \[1\]"),
            (lambda: generate("gpt2", None, input_ids=ids[:1]), "model: received type str"),
            (lambda: generate(model, None, input_ids=ids[:1] + 10 ** 6), "input_ids: received token ids from"),
            (lambda: generate(model, None, input_ids=ids[:1], prefill_chunk_size=8), "prefill_chunk_size: received 8"),
            (lambda: generate(model, None, input_ids=ids[:1], use_cache=False), "use_cache: received False"),
            (lambda: generate(model, None, input_ids=ids[:1], cache_implementation="static"),
             "cache_implementation: received 'static'"),
            (lambda: generate(model, None, input_ids=ids[:1], generation_config=GenerationConfig(
                cache_implementation="offloaded")), "generation_config.cache_implementation: received 'offloaded'")):
        with pytest.raises(ReFreeKVError, match=message):
            call()


def test_layers_on_different_devices_are_never_planned_in_one_call():
    """A model split over devices (device_map="auto") keeps each layer's cache on its layer's device, and
    one compress_layers call refuses arrays of two devices: the engines group layers by device too
    (shapes and dtypes alone would put a cuda:0 layer and a cuda:1 layer in one call). CPU and meta
    tensors stand for two devices here; scripts/gpu_check.py runs a model split over cuda:0 and the CPU."""
    import refreekv
    from refreekv.adapters.transformers import plan_group

    K, q = torch.zeros(1, 3, 40, 64), torch.zeros(1, 9, 32, 64)
    assert plan_group(K, q) == plan_group(K.clone(), q.clone())
    assert plan_group(K, q) != plan_group(K.to("meta"), q.to("meta"))
    assert plan_group(K, q) != plan_group(K.double(), q.double())
    with pytest.raises(ReFreeKVError, match=r"keys\[1\]"):  # what one mixed call would do
        refreekv.plan_layers([q, q.to("meta")], [K, K.to("meta")])


def test_beam_search_and_several_sequences_carry_the_kept_slots(smol, prompt):
    # generate() expands the batch (batch_repeat_interleave) and beam search reorders it
    # (batch_select_indices): at T = 0 the output is the full cache's; compressed, every row's slot mask follows
    model, _ = smol
    n = prompt["input_ids"].shape[1]
    for kw in (dict(num_beams=3), dict(do_sample=True, top_k=1, num_return_sequences=2)):
        torch.manual_seed(0)
        full = model.generate(**prompt, max_new_tokens=8, **kw)
        torch.manual_seed(0)
        out, cache = generate(model, ReFreeKVConfig(threshold=0.0), **prompt, max_new_tokens=8, **kw)
        assert out.tolist() == full.tolist()
        torch.manual_seed(0)
        out, cache = generate(model, ReFreeKVConfig(), **prompt, max_new_tokens=8, **kw)
        rows = kw.get("num_beams", kw.get("num_return_sequences"))
        assert out.shape[0] == (1 if "num_beams" in kw else rows)
        squeezed = [layer for layer in cache.layers if layer.compressed]
        assert squeezed and all(layer.slot_valid.shape[0] == rows and layer.keys.shape[0] == rows for layer in squeezed)
        # each row's slot mask marks exactly its kept prompt tokens; every token decoded after the prefill follows
        decoded = cache.get_seq_length() - n
        assert decoded == 7
        by_index = {r.layer: r for r in cache.report.layers}
        for i, layer in enumerate(cache.layers):
            if layer.compressed:
                assert layer.slot_valid.sum(-1).tolist() == list(by_index[i].kept)
                assert layer.keys.shape[-2] == layer.slot_valid.shape[-1] + decoded


def test_hooks_are_removed_and_plain_caches_untouched(smol, prompt):
    model, _ = smol
    own = len(model._forward_pre_hooks)
    with refreekv_hooks(model):
        assert all(m._forward_hooks for m in attention_modules(model)) and len(model._forward_pre_hooks) == own + 1
        plain = DynamicCache(config=model.config)
        with torch.no_grad():
            model(**prompt, cache=plain)
        assert plain.layers[5].keys.shape[-2] == prompt["input_ids"].shape[1]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in attention_modules(model))
    assert len(model._forward_pre_hooks) == own


def tiny(arch: str):
    """A small random model of another architecture (no weights needed to test the plumbing)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=6)
    torch.manual_seed(0)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "mistral":  # Mistral's default 4096 sliding window would make every layer sliding
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    cfg = Gemma3TextConfig(**common, sliding_window=16,
                           layer_types=["sliding_attention", "full_attention"] * 3)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma3"])
@torch.no_grad()
def test_other_architectures(arch):
    model = tiny(arch)
    ids = {"input_ids": torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(1))}
    ids["attention_mask"] = torch.ones_like(ids["input_ids"])  # token 0 is a pad id for some configs
    full = model.generate(**ids, **GREEDY)
    out, cache = generate(model, ReFreeKVConfig.evicting(threshold=0.0, retained_layers=()), **ids, **GREEDY)
    assert out.tolist() == full.tolist()
    out, cache = generate(model, ReFreeKVConfig.evicting(threshold=0.3, retained_layers=()), **ids, **GREEDY)
    assert out.shape == full.shape
    for rep, layer in zip(cache.report.layers, cache.layers):
        if getattr(layer, "is_sliding", False):
            assert not rep.compressed and rep.reason == "sliding-window layer (left alone)"
    assert any(r.compressed for r in cache.report.layers)


@torch.no_grad()
def test_misuse_of_a_cache_is_one_error_not_a_crash_or_a_wrong_cache():
    """Calls without the hooks (the prompt would go uncompressed; a compressed layer would attend
    without its mask), a cache of another model, another batch, token ids past the vocabulary, and
    nested hook blocks (a no-op, not a second capture)."""
    model, other = tiny("qwen2"), tiny("mistral")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 40), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cfg = ReFreeKVConfig.evicting(threshold=0.2, retained_layers=(), query_rows=8)
    with pytest.raises(ReFreeKVError, match="model: received a forward pass with a ReFreeKVCache outside refreekv_hooks"):
        model(ids, attention_mask=mask, past_key_values=ReFreeKVCache(model, cfg))  # the prefill
    cache = ReFreeKVCache(model, cfg)
    with refreekv_hooks(model):
        model(ids, attention_mask=mask, past_key_values=cache)
    assert any(r.compressed for r in cache.report.layers)
    step = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
    with pytest.raises(ReFreeKVError, match="outside refreekv_hooks"):  # decoding after the block
        model(ids[:, -1:], attention_mask=step, past_key_values=cache)
    with refreekv_hooks(model), pytest.raises(ReFreeKVError, match="input_ids: received a batch of 1 on a cache that holds 2"):
        model(ids[:1, -1:], past_key_values=cache)
    with refreekv_hooks(other), pytest.raises(ReFreeKVError, match="cache: received a ReFreeKVCache made for another model"):
        other(ids[:1], past_key_values=ReFreeKVCache(model, cfg))
    with refreekv_hooks(model), pytest.raises(ReFreeKVError, match="use_cache: received False with a ReFreeKVCache"):
        model.generate(ids, attention_mask=mask, past_key_values=cache, use_cache=False, max_new_tokens=2)
    assert cache.get_seq_length() == 40 and len(cache.history.plans) == 1  # refused before anything was appended
    with pytest.raises(ReFreeKVError, match="input_ids: received token ids from .* to 128"):
        capture_prefill(model, torch.full((1, 8), 128))
    once, twice = ReFreeKVCache(model, cfg), ReFreeKVCache(model, cfg)
    with refreekv_hooks(model):
        a = model(ids, attention_mask=mask, past_key_values=once).logits
        with refreekv_hooks(model):
            b = model(ids, attention_mask=mask, past_key_values=twice).logits
        c = model(ids[:, -1:], attention_mask=step, past_key_values=twice).logits  # the outer block still holds
    assert torch.equal(a, b) and len(twice.history.plans) == len(once.history.plans) == 1
    assert [r.kept for r in twice.report.layers] == [r.kept for r in once.report.layers] and c.isfinite().all()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in attention_modules(model))


@torch.no_grad()
def test_a_prefill_compressed_many_ways_equals_the_hooks(smol, prompt):
    """capture_prefill + ReFreeKVCache.from_prefill (one prefill, many configurations, plans shared
    across fixed budgets) gives the cache the hooks give, configuration by configuration."""
    from refreekv.adapters.transformers import capture_prefill

    model, _ = smol
    cfgs = [ReFreeKVConfig.paper(), ReFreeKVConfig.evicting(query_rows=32, combine="max"),
            ReFreeKVConfig.evicting(ranking="h2o", halting="ratio", budget=0.3, retained_layers=()),
            ReFreeKVConfig.evicting(ranking="h2o", halting="ratio", budget=0.6, retained_layers=()),
            ReFreeKVConfig.evicting(ranking="pooled", query_rows=16, norm="l1")]
    pre = capture_prefill(model, prompt["input_ids"], configs=cfgs)
    full = [layer.keys.clone() for layer in pre.cache.layers]
    for cfg in cfgs:
        built = ReFreeKVCache.from_prefill(pre, cfg)
        hooked = ReFreeKVCache(model, cfg)
        with refreekv_hooks(model):
            model(**prompt, cache=hooked)
        assert [r.kept for r in built.report.layers] == [r.kept for r in hooked.report.layers]
        for a, b in zip(built.layers, hooked.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(full, pre.cache.layers))  # never written


def _chat(model, tok, cache, turns, max_new_tokens=12):
    msgs, answers = [], []
    for turn in turns:
        msgs.append({"role": "user", "content": turn})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with refreekv_hooks(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        msgs.append({"role": "assistant", "content": answers[-1]})
    return answers


@torch.no_grad()
def test_replanning_each_turn_keeps_positions_and_the_full_answers_at_zero_threshold(smol):
    model, tok = smol
    turns = [needle_prompt(250, 0.3, number=4321, question=False), "Say it in one short sentence.",
             "What was the magic number?"]
    full = _chat(model, tok, DynamicCache(config=model.config), turns)
    for replan in ("turns", "history", "chat"):  # every re-planning rule keeps every token at T = 0
        cache = ReFreeKVCache(model, ReFreeKVConfig(threshold=0.0, replan=replan))
        assert _chat(model, tok, cache, turns) == full, replan
        assert len(cache.history.plans) == 3  # the prompt, then each later turn
    small = ReFreeKVCache(model, ReFreeKVConfig.evicting(query_rows=16, replan="turns"))
    _chat(model, tok, small, turns)
    held = sum(layer.keys.shape[-2] for layer in small.layers)
    seen = small.get_seq_length()
    assert held < 0.9 * seen * len(small.layers)  # memory follows the conversation


def _spy_compress_layers(monkeypatch) -> list:
    """Record every ``refreekv.compress_layers`` call an engine makes: (q rows, keys) in float64 NumPy,
    the configuration used and the keyword arguments; the call itself goes through."""
    import refreekv

    calls = []
    real = refreekv.compress_layers

    def spy(q, keys, values, config, **kw):
        calls.append(([x.double().numpy() for x in q], [x.double().numpy() for x in keys], config, kw))
        return real(q, keys, values, config, **kw)

    monkeypatch.setattr(refreekv, "compress_layers", spy)
    return calls


@torch.no_grad()
def test_a_replan_cuts_as_the_reference_on_the_captured_tensors(smol, monkeypatch):
    """A re-plan runs the rule over the kept slots plus the new segment with the segment's queries;
    each layer's cut equals the float64 reference on exactly those tensors (within the float margin),
    and a segment's re-plan keeps the new segment's newest token."""
    model, tok = smol
    cfg = ReFreeKVConfig.evicting(query_rows=8, replan="turns")
    calls = _spy_compress_layers(monkeypatch)
    cache = ReFreeKVCache(model, cfg)
    first = tok([chat(tok, needle_prompt(200, 0.5))], return_tensors="pt")["input_ids"]
    seg = tok(["<|im_start|>user\nAnd what else is there to say about it?<|im_end|>\n"], return_tensors="pt")["input_ids"]
    with refreekv_hooks(model):
        model(input_ids=first, cache=cache)
        n, before = cache.get_seq_length(), len(calls)
        model(input_ids=seg, cache=cache)
    assert cache.get_seq_length() == n + seg.shape[1]  # positions stay true across the re-plan
    replans = calls[before:]
    report = {r.layer: r for r in cache.history.plans[-1].layers}
    checked = 0
    for qs, ks, used, kw in replans:
        for q, K, layer, scale in zip(qs, ks, kw["layers"], kw["scale"]):
            if used.is_retained(layer):
                continue
            want = R.plan_layer(q, K, used, scale=scale)
            lo, hi = valid_cut_range(want["ratio"][0], used.threshold, 2e-4, used.sinks, K.shape[2])
            assert lo <= report[layer].kept[0] <= hi, (layer, report[layer].kept, lo, hi)
            # the newest token stays: the layer's last stored key is the segment's newest key (comparing the
            # reference's idx cut at the engine's count would be wrong when the counts differ by one at a
            # float boundary, which the range above allows)
            stored = cache.layers[layer].keys[0, :, report[layer].kept[0] - 1].double().numpy()
            assert cache.layers[layer].keys.shape[2] == report[layer].kept[0]
            np.testing.assert_allclose(stored, K[0, :, -1], rtol=0, atol=1e-6)
            checked += 1
    assert checked >= 20 and len(cache.history.plans) == 2


@torch.no_grad()
@pytest.mark.parametrize("replan", ["history", "chat"])
def test_history_replanning_keeps_the_turn_being_answered_whole(smol, monkeypatch, replan):
    """replan="history": the first prompt is not compressed (so its answer is the full cache's);
    replan="chat": the first prompt is compressed as "turns" compresses it (same kept slots, same
    answer). Then a later segment is planned over everything with its own queries, and each layer's
    cut is the reference's with the segment protected (keep_newest): at least the sinks plus the
    whole segment."""
    model, tok = smol
    cfg = ReFreeKVConfig.evicting(query_rows=8, threshold=0.01, replan=replan)
    calls = _spy_compress_layers(monkeypatch)
    turns = [needle_prompt(200, 0.5, number=2718, question=False), "What was the magic number?"]
    full = _chat(model, tok, DynamicCache(config=model.config), turns[:1])
    cache = ReFreeKVCache(model, cfg)
    first_answer = _chat(model, tok, cache, turns[:1])
    first = cache.history.plans[0]
    if replan == "history":
        assert first_answer == full  # the first turn is answered with its prompt whole
        assert not first.compressed_layers and all(r.kept == r.prompt_lengths for r in first.layers)
    else:
        turns_cache = ReFreeKVCache(model, dataclasses.replace(cfg, replan="turns"))
        assert first_answer == _chat(model, tok, turns_cache, turns[:1])
        assert [r.kept for r in first.layers] == [r.kept for r in turns_cache.history.plans[0].layers]
        assert first.compressed_layers and calls[0][3]["keep_newest"] is None
        for layer, mine in enumerate(cache.layers):  # the same slots as "turns" kept
            assert torch.equal(mine.keys, turns_cache.layers[layer].keys)
        full = first_answer  # this chat's history is its own answer
    msgs = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": full[0]},
            {"role": "user", "content": turns[1]}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    seg = ids.shape[1] - cache.get_seq_length()
    before = len(calls)
    with refreekv_hooks(model):
        model(input_ids=ids[:, -seg:], cache=cache)
    report = {r.layer: r for r in cache.history.plans[-1].layers}
    checked = 0
    for qs, ks, used, kw in calls[before:]:
        assert kw["keep_newest"] == seg
        for q, K, layer, scale in zip(qs, ks, kw["layers"], kw["scale"]):
            if used.is_retained(layer):
                continue
            n = K.shape[2]
            want = R.plan_layer(q, K, used, scale=scale)
            lo, hi = valid_cut_range(want["ratio"][0], used.threshold, 2e-4, used.sinks, n)
            floor = min(n, used.sinks + seg)
            assert max(lo, floor) <= report[layer].kept[0] <= max(hi, floor), (layer, report[layer].kept, lo, hi, floor)
            checked += 1
    assert checked >= 20 and any(r.kept[0] < r.prompt_lengths[0] for r in report.values())  # the history was compressed
    assert len(cache.history.plans) == 2


def test_an_error_inside_generate_leaves_no_hook_and_a_usable_model(smol, prompt):
    model, _ = smol

    class Stop(Exception):
        pass

    def boom(*a, **k):
        raise Stop

    handle = attention_modules(model)[3].register_forward_hook(boom)
    try:
        for exc in (Stop, KeyboardInterrupt):
            def raise_it(*a, exc=exc, **k):
                raise exc
            handle.remove()
            handle = attention_modules(model)[3].register_forward_hook(raise_it)
            with pytest.raises(exc):
                generate(model, ReFreeKVConfig(), **prompt, **GREEDY)
            mods = attention_modules(model)
            assert sum(len(m._forward_hooks) for m in mods) == 1  # only the test's own hook is left
            assert not any(m._forward_pre_hooks for m in mods)
    finally:
        handle.remove()
    out, cache = generate(model, ReFreeKVConfig(threshold=0.0), **prompt, **GREEDY)
    assert out.tolist() == full_generate(model, prompt).tolist()  # the model still works


def test_many_generate_calls_hold_memory_flat(smol):
    import gc
    import resource

    model, tok = smol
    ids = tok([chat(tok, needle_prompt(120, 0.5))], return_tensors="pt")
    sizes = []
    for i in range(100):
        out, cache = generate(model, ReFreeKVConfig.evicting(query_rows=8), **ids, do_sample=False, max_new_tokens=2)
        del out, cache
        if i in (19, 99):
            gc.collect()
            sizes.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in attention_modules(model))
    assert sizes[1] - sizes[0] < 64 * 1024  # KiB: the peak stays where 20 calls put it


def test_two_models_with_hooks_at_once_do_not_interfere():
    a, b = tiny("qwen2"), tiny("mistral")
    ids = {"input_ids": torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))}
    ids["attention_mask"] = torch.ones_like(ids["input_ids"])
    alone = [generate(m, ReFreeKVConfig.evicting(threshold=0.2, retained_layers=()), **ids, **GREEDY)[0] for m in (a, b)]
    ca, cb = ReFreeKVCache(a, ReFreeKVConfig.evicting(threshold=0.2, retained_layers=())), \
        ReFreeKVCache(b, ReFreeKVConfig.evicting(threshold=0.2, retained_layers=()))
    with refreekv_hooks(a), refreekv_hooks(b), torch.no_grad():
        oa = a.generate(**ids, cache=ca, **GREEDY)
        ob = b.generate(**ids, cache=cb, **GREEDY)
    assert oa.tolist() == alone[0].tolist() and ob.tolist() == alone[1].tolist()


@torch.no_grad()
def test_replanning_during_generation(smol, prompt):
    model, _ = smol
    kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
    out, cache = generate(model, ReFreeKVConfig.evicting(threshold=0.0, replan_every=8), **prompt, **kw)
    assert out.tolist() == model.generate(**prompt, **kw).tolist()  # T = 0: the full cache's tokens
    assert len(cache.history.plans) == 3  # the prompt, then after generated tokens 8 and 16 (19 decode calls)
    _, every = generate(model, ReFreeKVConfig.evicting(replan_every=8), **prompt, **kw)
    _, once = generate(model, ReFreeKVConfig.evicting(), **prompt, **kw)
    held = lambda c: sum(layer.keys.shape[-2] for layer in c.layers)  # noqa: E731
    assert held(every) < held(once) and every.get_seq_length() == once.get_seq_length()


@torch.no_grad()
def test_history_keeps_the_whole_turn_through_generation_replans(smol, prompt):
    """replan="history" with replan_every: a single prompt is the turn, so nothing is ever evicted (the full
    cache's tokens); in a second turn every plan, also those during generation, keeps the segment and the
    tokens generated since, while the history is compressed."""
    model, tok = smol
    kw = dict(do_sample=False, max_new_tokens=20, min_new_tokens=20)
    cfg = ReFreeKVConfig.evicting(threshold=0.05, replan="history", replan_every=8)
    out, cache = generate(model, cfg, **prompt, **kw)
    assert out.tolist() == model.generate(**prompt, **kw).tolist()
    assert len(cache.history.plans) == 3 and not any(p.compressed_layers for p in cache.history.plans)
    seg = tok(["<|im_start|>user\nAnd what else is there to say about it?<|im_end|>\n<|im_start|>assistant\n"],
              return_tensors="pt")["input_ids"]
    ids = torch.cat([out, seg], 1)
    with refreekv_hooks(model):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **kw)
    plans = cache.history.plans[3:]  # the segment, then after generated tokens 8 and 16
    assert len(plans) == 3 and plans[0].compressed_layers  # the history was compressed
    for i, plan in enumerate(plans):
        floor = cfg.sinks + seg.shape[1] + 8 * i  # the segment (and the token before it), then 8 more each time
        assert all(r.kept[0] >= min(floor, r.prompt_lengths[0]) for r in plan.layers), (i, floor)


@torch.no_grad()
def test_a_segment_of_at_most_sinks_tokens_is_appended_without_a_plan(smol, prompt):
    """The n <= sinks + 1 rule for later segments: too few queries to judge the cache by, so a short
    segment is appended as it is; a longer one is planned."""
    model, tok = smol
    cache = ReFreeKVCache(model, ReFreeKVConfig())  # replan="turns", 4 sinks
    with refreekv_hooks(model):
        model(**prompt, cache=cache)
        before = [layer.keys.clone() for layer in cache.layers]
        plans, n = len(cache.history.plans), prompt["input_ids"].shape[1]
        short = tok(" Yes, go.", return_tensors="pt")["input_ids"][:, :4]
        model(input_ids=short, attention_mask=torch.ones(1, n + 4, dtype=torch.long), cache=cache)
    assert len(cache.history.plans) == plans
    for old, layer in zip(before, cache.layers):
        assert layer.keys.shape[-2] == old.shape[-2] + 4 and torch.equal(layer.keys[..., :old.shape[-2], :], old)
    longer = tok(" And now tell me about the essay, please.", return_tensors="pt")["input_ids"][:, :5]  # sinks + 1
    with refreekv_hooks(model):
        model(input_ids=longer, attention_mask=torch.ones(1, n + 4 + longer.shape[1], dtype=torch.long), cache=cache)
    assert len(cache.history.plans) == plans + 1


@pytest.mark.parametrize("arch", ["smol", "qwen2", "gemma3"])
@torch.no_grad()
def test_recomputed_score_queries_are_the_models_own(arch, smol):
    """The queries the cache recomputes from a layer's captured rows (q_proj, q_norm where the model
    has one, RoPE at the rows' true positions) equal those the attention module itself computed."""
    import sys

    from refreekv.adapters.transformers import Captured

    model = smol[0] if arch == "smol" else tiny(arch)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    seen, inputs = [], {}
    namespace = sys.modules[type(attention_modules(model)[0]).__module__]
    real = namespace.apply_rotary_pos_emb

    def record(q, k, *args, **kw):
        out = real(q, k, *args, **kw)
        seen.append(out[0])
        return out

    hooks = [m.register_forward_hook(lambda mod, a, kw, o: inputs.__setitem__(mod.layer_idx, kw), with_kwargs=True)
             for m in attention_modules(model)]
    namespace.apply_rotary_pos_emb = record
    try:
        model(input_ids=ids, cache=DynamicCache(config=model.config))
    finally:
        namespace.apply_rotary_pos_emb = real
        for h in hooks:
            h.remove()
    modules = attention_modules(model)
    assert len(seen) == len(modules)
    for m, own in zip(modules, seen):
        kw = inputs[m.layer_idx]
        cos, sin = kw["position_embeddings"]
        cap = Captured(m, kw["hidden_states"][:, -8:], cos[:, -8:], sin[:, -8:])
        torch.testing.assert_close(cap.queries(8), own[:, :, -8:], atol=1e-5, rtol=1e-5)


def _by_hand(module, kw, keys, values, kept):
    """A layer's attention output computed by hand: each of the call's q tokens sees the ``kept``
    slots and, causally, the call's own tokens (the last q slots of ``keys``)."""
    h, (cos, sin) = kw["hidden_states"], kw["position_embeddings"]
    q_len = h.shape[1]
    q = module.q_proj(h).view(1, q_len, -1, module.head_dim).transpose(1, 2)
    half = module.head_dim // 2
    q = q * cos[:, None] + torch.cat([-q[..., half:], q[..., :half]], -1) * sin[:, None]
    g = q.shape[1] // keys.shape[1]
    logits = q @ keys.repeat_interleave(g, 1).transpose(-1, -2) * module.scaling
    S = keys.shape[-2]
    col, row = torch.arange(S)[None, :], torch.arange(q_len)[:, None]
    visible = (col < kept) | ((col >= S - q_len) & (col - (S - q_len) <= row))
    w = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1)
    return module.o_proj((w @ values.repeat_interleave(g, 1)).transpose(1, 2).reshape(1, q_len, -1))


@pytest.mark.parametrize("with_mask", [True, False], ids=["attention_mask", "no_mask"])
@torch.no_grad()
def test_segments_after_a_plan_attend_to_the_kept_slots_and_causally_to_themselves(smol, prompt, with_mask):
    """A multi-token call on a compressed cache (after the first plan, and again after a re-plan), with
    and without an attention mask: each layer's output equals attention by hand over its kept slots
    plus the call's own tokens, causally; no token sees a later one of its segment (nor misses
    itself), and positions continue from the true length."""
    model, tok = smol
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.05, replan="turns"))
    n = prompt["input_ids"].shape[1]
    with refreekv_hooks(model):
        model(**prompt, cache=cache)
    segments = [tok(["<|im_start|>user\nAnd what else is there to say about it?<|im_end|>\n"],
                    return_tensors="pt")["input_ids"],
                tok(["<|im_start|>user\nTell me more, please.<|im_end|>\n"], return_tensors="pt")["input_ids"]]
    seen_len = n
    for seg in segments:
        layer_idx = max(range(2, len(cache.layers)), key=lambda i: seen_len - cache.layers[i].keys.shape[-2])
        layer, module = cache.layers[layer_idx], attention_modules(model)[layer_idx]
        kept = layer.keys.shape[-2]
        assert kept < seen_len and layer.all_slots_valid
        seen = {}
        hook = module.register_forward_hook(lambda m, a, kw, out: seen.update(kw=kw, out=out[0]), with_kwargs=True)
        keys_after = {}
        spy = module.register_forward_hook(
            lambda m, a, kw, out: keys_after.update(k=layer.keys, v=layer.values), with_kwargs=True, prepend=True)
        mask = {"attention_mask": torch.ones(1, seen_len + seg.shape[1], dtype=torch.long)} if with_mask else {}
        with refreekv_hooks(model):
            model(input_ids=seg, cache=cache, **mask)
        hook.remove(), spy.remove()
        q_len = seg.shape[1]
        assert seen["kw"]["position_ids"].tolist() == [list(range(seen_len, seen_len + q_len))]
        K, V = keys_after["k"], keys_after["v"]
        assert K.shape[-2] == kept + q_len
        torch.testing.assert_close(seen["out"], _by_hand(module, seen["kw"], K, V, kept), atol=1e-5, rtol=1e-4)
        seen_len += q_len
    assert len(cache.history.plans) == 3


@torch.no_grad()
def test_reordering_a_compressed_batch_moves_each_rows_slot_mask_with_it(smol):
    """batch_select_indices / batch_repeat_interleave (beam search, several sequences) carry each
    row's slot mask with its keys, for a batch whose samples kept different numbers of slots."""
    model, tok = smol
    tok.padding_side = "left"
    batch = tok([chat(tok, needle_prompt(300, depth=0.3)), chat(tok, "Name three colours.")],
                return_tensors="pt", padding=True)
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.01))
    with refreekv_hooks(model):
        model(**batch, cache=cache)
    layers = [layer for layer in cache.layers if layer.compressed and not layer.all_slots_valid]
    assert layers  # some layer holds padded slots for the shorter sample
    before = [(layer.keys.clone(), layer.slot_valid.clone()) for layer in layers]
    cache.batch_select_indices(torch.tensor([1, 0]))
    for layer, (k, valid) in zip(layers, before):
        assert torch.equal(layer.keys, k[[1, 0]]) and torch.equal(layer.slot_valid, valid[[1, 0]])
    cache.batch_repeat_interleave(2)
    for layer, (k, valid) in zip(layers, before):
        assert torch.equal(layer.keys, k[[1, 1, 0, 0]]) and torch.equal(layer.slot_valid, valid[[1, 1, 0, 0]])
    cache.reorder_cache(torch.tensor([2, 0, 3, 1]))  # beam search's reorder
    for layer, (k, valid) in zip(layers, before):
        assert torch.equal(layer.keys, k[[0, 1, 0, 1]]) and torch.equal(layer.slot_valid, valid[[0, 1, 0, 1]])


@torch.no_grad()
def test_a_reset_cache_is_as_new(smol):
    """Cache.reset() empties a used cache (compressed, re-planned for a second turn): the next prompt gets
    the tokens and the per-layer plan of a fresh cache, not the old slots, masks or turn."""
    model, tok = smol
    first = tok([chat(tok, needle_prompt(200, 0.5, number=7417))], return_tensors="pt")
    later = tok([chat(tok, needle_prompt(120, 0.3, number=1234))], return_tensors="pt")
    cfg = ReFreeKVConfig.evicting(threshold=0.05, replan="turns")

    def answer(ids, cache):
        with refreekv_hooks(model):
            out = model.generate(**ids, cache=cache, max_new_tokens=8, do_sample=False)
        return out[0, ids["input_ids"].shape[1]:].tolist()

    used = ReFreeKVCache(model, cfg)
    answer(first, used)
    turn = tok(["<|im_start|>user\nAnd the number again?<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with refreekv_hooks(model):  # a second segment: planned, the history compressed
        model(input_ids=turn["input_ids"], cache=used)
    assert any(layer.compressed for layer in used.layers) and len(used.history.plans) == 2
    used.reset()
    assert used.get_seq_length() == 0 and not used.history.plans
    fresh = ReFreeKVCache(model, cfg)
    assert answer(later, used) == answer(later, fresh)
    assert [r.kept for r in used.report.layers] == [r.kept for r in fresh.report.layers]
    assert [layer.kept_slots for layer in used.layers] == [layer.kept_slots for layer in fresh.layers]
    assert len(used.history.plans) == 1 and any(layer.compressed for layer in used.layers)


@torch.no_grad()
def test_a_padded_batch_decodes_the_same_with_or_without_an_attention_mask(smol):
    """Decoding a left-padded, compressed batch without an attention mask (each layer then builds its
    mask from its own slot mask and causality alone) gives the logits of the same step with the mask.
    No layer is retained: a plain (retained) layer would attend to the padding without a mask."""
    model, tok = smol
    tok.padding_side = "left"
    batch = tok([chat(tok, needle_prompt(300, depth=0.6)), chat(tok, "Name three colours.")],
                return_tensors="pt", padding=True)
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.01, retained_layers=()))
    with refreekv_hooks(model):
        nxt = model(**batch, cache=cache).logits[:, -1:].argmax(-1)
    assert any(layer.compressed and not layer.all_slots_valid for layer in cache.layers)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    twin, positions = copy.deepcopy(cache), mask.cumsum(-1)[:, -1:] - 1  # each sample's own next position
    with refreekv_hooks(model):
        with_mask = model(input_ids=nxt, attention_mask=mask, position_ids=positions, cache=cache).logits
        without = model(input_ids=nxt, position_ids=positions, cache=twin).logits
    torch.testing.assert_close(without, with_mask, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_a_plan_during_generation_scores_only_tokens_generated_since_the_last_plan(smol, prompt, monkeypatch):
    """With replan_every, the rows that score a plan are the newest generated tokens' own: tokens
    generated before a new segment was planned never score a later plan (their positions are older
    than the segment's)."""
    import refreekv

    model, tok = smol
    rows_used = []
    real = refreekv.compress_layers

    def spy(q, keys, values, config, **kw):
        rows_used.extend(x.shape[2] for x, i in zip(q, kw["layers"]) if not config.is_retained(i))
        return real(q, keys, values, config, **kw)

    monkeypatch.setattr(refreekv, "compress_layers", spy)
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(replan="turns", replan_every=4))
    n = prompt["input_ids"].shape[1]
    step = lambda ids, seen: model(input_ids=ids, attention_mask=torch.ones(1, seen + ids.shape[1], dtype=torch.long),
                                   cache=cache).logits[:, -1:].argmax(-1)  # noqa: E731
    with refreekv_hooks(model):
        nxt, seen = step(prompt["input_ids"], 0), n
        for _ in range(3):  # 3 generated tokens: fewer than replan_every, no plan
            nxt, seen = step(nxt, seen), seen + 1
        plans = len(cache.history.plans)
        seg = tok(["<|im_start|>user\nAnd what else is there to say about it?<|im_end|>\n"], return_tensors="pt")["input_ids"]
        nxt, seen = step(seg, seen), seen + seg.shape[1]
        assert len(cache.history.plans) == plans + 1
        del rows_used[:]
        for _ in range(4):  # 4 tokens generated after the segment: one plan, scored by those 4 rows
            nxt, seen = step(nxt, seen), seen + 1
    assert len(cache.history.plans) == plans + 2
    assert rows_used and set(rows_used) == {4}, rows_used


@torch.no_grad()
def test_a_call_that_failed_inside_a_layer_does_not_let_a_later_unhooked_call_through():
    """A forward that raises between a layer's pre-hook and its cache update must not leave that layer
    marked as called through the hooks: a later call outside refreekv_hooks is then refused at the
    first layer, before any layer appends to the cache (it once appended to layer 0, then raised)."""
    model = tiny("qwen2")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.1, retained_layers=()))
    with refreekv_hooks(model):
        model(input_ids=ids, cache=cache)
    for failing in (0, 3):  # the first layer, and one in the middle
        k_proj = attention_modules(model)[failing].k_proj

        def boom(*a, **k):
            raise RuntimeError("inside the layer")

        handle = k_proj.register_forward_pre_hook(boom)  # after the layer's pre-hook, before its update
        try:
            with refreekv_hooks(model), pytest.raises(RuntimeError, match="inside the layer"):
                model(input_ids=ids[:, :1], cache=cache)
        finally:
            handle.remove()
        assert not cache.layers[failing].hooked
        held = [layer.keys.shape[-2] for layer in cache.layers]
        with pytest.raises(ReFreeKVError, match="outside refreekv_hooks"):
            model(input_ids=ids[:, :1], cache=cache)
        assert [layer.keys.shape[-2] for layer in cache.layers] == held  # nothing was appended


@torch.no_grad()
def test_a_text_generation_pipeline_chat_reuses_the_cache_turn_after_turn(smol):
    """transformers' pipeline("text-generation") passes the cache to generate: a three-turn chat with one
    ReFreeKVCache gives the answers of the same chat with a DynamicCache at T = 0, and the cache is planned
    at every turn (the pipeline re-sends the whole conversation; generate prefills only what is new)."""
    from transformers import pipeline

    model, tok = smol
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    questions = ["My locker code is 4417. Remember it.", "What is the capital of France?", "What is my locker code?"]

    def chat_with(cache):
        messages = []
        for q in questions:
            messages = pipe(messages + [{"role": "user", "content": q}], cache=cache, **GREEDY)[0]["generated_text"]
        return [m["content"] for m in messages if m["role"] == "assistant"]

    full = chat_with(DynamicCache(config=model.config))
    cache = ReFreeKVCache(model, ReFreeKVConfig(threshold=0.0))
    with refreekv_hooks(model):
        assert chat_with(cache) == full
    assert len(cache.history.plans) == 3 and cache.report.budget[0] == 1.0
    cache = ReFreeKVCache(model, ReFreeKVConfig())
    with refreekv_hooks(model):
        chat_with(cache)
    assert len(cache.history.plans) == 3 and cache.report.budget[0] < 1.0


@torch.no_grad()
def test_crop_removes_what_came_after_the_plan_as_the_deferred_stop_check_needs(smol, prompt):
    """On "mps", transformers' decode loop defers its stop check by a step (DeferredStopCheck): it crops
    the cache by 0 every step and by the extra step's token at the end. Simulated on CPU (its events made
    no-ops: CPU ops are synchronous), the compressed cache gives the tokens of the plain loop. A crop of
    tokens added since the plan is exact; one into planned slots is refused before anything is removed."""
    from unittest import mock

    from transformers.generation.utils import DeferredStopCheck

    class NoEvent:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args):
            pass

        def synchronize(self):
            pass

    model, _ = smol
    n = prompt["input_ids"].shape[1]
    ref, _ = generate(model, ReFreeKVConfig(), **prompt, max_new_tokens=10, do_sample=False)
    cache = ReFreeKVCache(model, ReFreeKVConfig())
    with mock.patch.object(DeferredStopCheck, "is_supported", staticmethod(lambda *a, **k: True)), \
            mock.patch("torch.Event", NoEvent), refreekv_hooks(model):
        out = model.generate(**prompt, cache=cache, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref) and cache.get_seq_length() == n + 9  # the extra step's token was cropped
    layer = cache.layers[5]
    assert layer.compressed and layer.keys.shape[-2] == layer.kept_slots + 9
    kept = layer.keys[..., :layer.kept_slots + 7, :].clone()
    cache.crop(-2)
    assert cache.get_seq_length() == n + 7 and torch.equal(layer.keys, kept)
    with pytest.raises(ReFreeKVError, match="crop: received -8; expected at most 7 tokens"):
        cache.crop(-8)
    assert cache.get_seq_length() == n + 7 and all(
        lay.keys.shape[-2] == lay.kept_slots + 7 for lay in cache.layers if lay.compressed)


@torch.no_grad()
def test_assisted_decoding_plans_what_precedes_the_candidates(smol, prompt, monkeypatch):
    """transformers' assisted decoding (prompt lookup, a draft model) runs the prompt together with its first
    candidates, then verifies 1 + k tokens per call and crops the rejected ones; on a cache that already
    holds a conversation its first call sends the whole sequence again. The plan covers the prompt alone
    (the kept slots of plain generate's plan), candidates are stored after the kept slots (so a crop removes
    them exactly), a verification call is generated tokens, not a new segment, and a second turn is planned
    over what the cache holds plus that turn, once. At T = 0 the tokens are plain generate's."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import refreekv.adapters.transformers as adapter

    model, tok = smol
    n = prompt["input_ids"].shape[1]
    seen = []
    own = adapter._assisted_step
    monkeypatch.setattr(adapter, "_assisted_step", lambda: seen.append(own()) or seen[-1])
    kw = dict(do_sample=False, max_new_tokens=40)
    turn = tok(["<|im_start|>user\nSay the number again, twice.<|im_end|>\n<|im_start|>assistant\n"],
               return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    draft = LlamaForCausalLM(LlamaConfig(vocab_size=model.config.vocab_size, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)).eval()

    def chat_of(config, **assist):
        cache = ReFreeKVCache(model, config)
        with refreekv_hooks(model):
            first = model.generate(**prompt, cache=cache, **kw, **assist)
            after_first = copy.deepcopy(cache)
            ids = torch.cat([first, turn], dim=1)
            second = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, **kw, **assist)
        return first, ids, second, after_first, cache

    def kept(plan):
        return [lay.kept for lay in plan.layers]

    plain = model.generate(**prompt, **kw)
    for config in (ReFreeKVConfig(threshold=0), ReFreeKVConfig(), ReFreeKVConfig.evicting(replan="history")):
        ref_first, _, ref_second, ref_after, ref = chat_of(config)
        for assist in ({"prompt_lookup_num_tokens": 6}, {"assistant_model": draft}):
            seen.clear()
            first, ids, second, after_first, cache = chat_of(config, **assist)
            label = (config.threshold, config.replan, list(assist))
            assert seen[0][0] > 0 and seen[0][1], label  # the prompt came with candidates
            assert cache.get_seq_length() == second.shape[1] - 1, label  # every token once
            assert cache._candidates == 0, label  # a later call that bypasses the model's hook sees no candidates
            one, two = cache.history.plans
            assert kept(one) == kept(ref.history.plans[0]), label  # the prompt's plan, candidates left out
            for a, b in zip(after_first.layers, ref_after.layers):
                if a.compressed:
                    torch.testing.assert_close(a.keys[..., :a.kept_slots, :], b.keys[..., :b.kept_slots, :],
                                               atol=1e-4, rtol=1e-4)
            # The second turn: what the first plan kept, the first answer and the turn, each once.
            assert [lay.prompt_lengths for lay in two.layers] == [[k + ids.shape[1] - n] for [k] in kept(one)], label
            if config.threshold == 0:
                assert torch.equal(first, ref_first) and torch.equal(second, ref_second), label
                assert torch.equal(first, plain), label
    with pytest.raises(ReFreeKVError, match="replan_every: received 8; expected 0 with assisted decoding"):
        generate(model, ReFreeKVConfig.evicting(replan_every=8), **prompt, **kw, prompt_lookup_num_tokens=6)
