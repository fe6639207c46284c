"""The quantized tail in the transformers cache (``ReFreeKVConfig(tail_bits=...)``): what the rule evicts is
kept at 8 or 4 bits and attended to, so a compressed cache is the full cache with its evicted positions
quantized; nothing is dropped, through batches, re-plans, beams and save/load; an engine that stores no
tail (the kvpress press) refuses it by name. The mlx-lm cache's tail: tests/test_mlx_lm.py."""

import copy

import pytest
import torch
from transformers import DynamicCache

import refreekv
from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv.adapters.transformers import (ReFreeKVCache, cache_bytes, capture_prefill, generate, load_cache,
                                            refreekv_hooks, save_cache)
from refreekv.commands.models import load_torch
from refreekv.commands.prompts import chat, needle_prompt

pytestmark = pytest.mark.model
GREEDY = {"do_sample": False, "max_new_tokens": 12}
PAPER8 = ReFreeKVConfig.paper(tail_bits=8)


@pytest.fixture(scope="module")
def smol():
    return load_torch()


@pytest.fixture(scope="module")
def prompt(smol):
    _, tok = smol
    return tok([chat(tok, needle_prompt(900, depth=0.2))], return_tensors="pt")


def _quantized_full_cache(pre, cache: ReFreeKVCache, bits: int) -> DynamicCache:
    """The full prefill's cache with every position the plan evicted quantize-dequantized (one sample,
    the position ranking: layer i keeps the sinks and its newest ``kept - sinks`` tokens), built with
    refreekv.quantize / dequantize only, not with the cache's own tail."""
    m = cache.refreekv_config.sinks
    full = copy.deepcopy(pre.cache)
    by_layer = {r.layer: r for r in cache.report.layers}
    for i, layer in enumerate(full.layers):
        rep = by_layer[i]
        if not rep.compressed:
            continue
        n, k = rep.prompt_lengths[0], rep.kept[0]
        lo, hi = m, n - (k - m)
        for name in ("keys", "values"):
            x = getattr(layer, name)
            x[:, :, lo:hi] = refreekv.dequantize(refreekv.quantize(x[:, :, lo:hi].contiguous(), bits=bits))
    return full


@pytest.mark.parametrize("bits", [8, 4])
@torch.no_grad()
def test_a_tail_cache_is_the_full_cache_with_its_evicted_positions_quantized(smol, prompt, bits):
    model, tok = smol
    ids = prompt["input_ids"]
    cfg = ReFreeKVConfig.paper(tail_bits=bits)
    pre = capture_prefill(model, ids, configs=[cfg])
    cache = ReFreeKVCache.from_prefill(pre, cfg)
    assert any(r.compressed for r in cache.report.layers)
    expected = _quantized_full_cache(pre, cache, bits)
    nxt = torch.tensor([[tok.encode(" The magic")[0]] * 3])  # three teacher-forced tokens
    with refreekv_hooks(model):
        got = model(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 3, dtype=torch.long),
                    cache=cache).logits
    want = model(input_ids=nxt, attention_mask=torch.ones(1, ids.shape[1] + 3, dtype=torch.long),
                 cache=expected).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    for layer, rep in zip(cache.layers, cache.report.layers):
        evicted = rep.prompt_lengths[0] - rep.kept[0]
        assert layer.tail_slots == (evicted if rep.compressed else 0)  # nothing the plan evicted is dropped


@torch.no_grad()
def test_the_tail_keeps_the_needle_the_eviction_loses_and_is_counted_in_the_bytes(smol, prompt):
    model, _ = smol
    full = model.generate(**prompt, **GREEDY)
    evict, c1 = generate(model, ReFreeKVConfig.paper(), **prompt, **GREEDY)
    tail, c2 = generate(model, PAPER8, **prompt, **GREEDY)
    assert tail.tolist() == full.tolist()
    assert [r.kept for r in c1.report.layers] == [r.kept for r in c2.report.layers]  # the same boundary
    rep = c2.report
    assert rep.bytes_before > rep.bytes_after > c1.report.bytes_after
    held = cache_bytes(c2)  # measured after generating 12 tokens: the report's bytes plus those tokens' K/V
    new = 2 * 12 * sum(layer.keys.shape[1] * layer.keys.shape[-1] * 4 for layer in c2.layers)
    assert abs(held - (rep.bytes_after + new)) <= 2 * len(c2.layers) * 64 * 4 * 3, (held, rep.bytes_after + new)


@torch.no_grad()
def test_a_padded_batch_with_a_tail_decodes_each_sample_as_alone(smol):
    model, tok = smol
    tok.padding_side = "left"
    texts = [chat(tok, needle_prompt(600, depth=0.3)), chat(tok, "Name three colours of the rainbow.")]
    batch = tok(texts, return_tensors="pt", padding=True)
    out_b, cache_b = generate(model, PAPER8, **batch, **GREEDY)
    assert any(layer.tail_slots and not layer.all_slots_valid for layer in cache_b.layers)  # padded tail slots
    for i, text in enumerate(texts):
        one = tok([text], return_tensors="pt")
        out_1, _ = generate(model, PAPER8, **one, **GREEDY)
        gen_1 = out_1[0, one["input_ids"].shape[1]:].tolist()
        assert out_b[i, batch["input_ids"].shape[1]:].tolist()[:len(gen_1)] == gen_1


def _turn(model, tok, cache, messages, text):
    messages = messages + [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with refreekv_hooks(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                             max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return messages + [{"role": "assistant", "content": answer}], answer


def test_replans_add_to_the_tail_and_save_load_round_trips_it(smol, tmp_path):
    model, tok = smol
    turns = [needle_prompt(300, 0.3, number=4321, question=False), "Say it in one short sentence.",
             "What was the magic number?"]
    cache, messages = ReFreeKVCache(model, ReFreeKVConfig.paper(tail_bits=8, replan="turns")), []
    grew = []
    for i, text in enumerate(turns):
        messages, answer = _turn(model, tok, cache, messages, text)
        for layer in cache.layers:  # every position a plan evicted sits in the tail: nothing is dropped
            assert int(layer.tail_valid.sum()) == layer.evicted if layer.tail_valid is not None else layer.evicted == 0
        grew.append(sum(layer.tail_slots for layer in cache.layers))
        if i == 1:
            save_cache(tmp_path / "chat.safetensors", cache)
            loaded = load_cache(tmp_path / "chat.safetensors", model)
            for x, y in zip(cache.layers, loaded.layers):
                for name, v in x.__dict__.items():
                    w = y.__dict__[name]
                    assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, name
            _, a_loaded = _turn(model, tok, loaded, messages, turns[2])
    assert answer == a_loaded and "4321" in answer
    assert grew[0] > 0 and grew[2] >= grew[1] >= grew[0]


@torch.no_grad()
def test_beams_carry_the_tail(smol, prompt):
    model, _ = smol
    out, cache = generate(model, PAPER8, **prompt, do_sample=False, max_new_tokens=6, num_beams=2,
                          num_return_sequences=2)
    full = model.generate(**prompt, do_sample=False, max_new_tokens=6, num_beams=2, num_return_sequences=2)
    assert out.tolist() == full.tolist()
    assert all(layer.tail_valid.shape[0] == 2 for layer in cache.layers if layer.tail_slots)


def test_tail_bits_is_checked_and_an_engine_without_a_tail_refuses_it_by_name():
    from refreekv.adapters import engine

    with pytest.raises(ReFreeKVError, match=r"^tail_bits: received 3; expected None \(drop what the rule evicts\) or 8 or 4"):
        ReFreeKVConfig(tail_bits=3)
    with pytest.raises(ReFreeKVError, match=r"^tail_bits: received True"):
        ReFreeKVConfig(tail_bits=True)
    assert ReFreeKVConfig.from_dict(ReFreeKVConfig(tail_bits=4).to_dict()).tail_bits == 4
    with pytest.raises(ReFreeKVError, match=r"^tail_bits: received 8; expected None with the kvpress press"):
        engine.refuse_tail(ReFreeKVConfig(tail_bits=8), "the kvpress press")
    engine.refuse_tail(ReFreeKVConfig.evicting(), "the kvpress press")  # no tail: nothing to refuse
    # the default keeps an 8-bit tail; the paper's configuration and the eviction rule keep none
    assert (ReFreeKVConfig().tail_bits, ReFreeKVConfig.paper().tail_bits, ReFreeKVConfig.evicting().tail_bits) == (8, None, None)


def test_a_damaged_tail_loads_nothing(smol, prompt, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = smol
    _, cache = generate(model, PAPER8, **prompt, do_sample=False, max_new_tokens=2)
    save_cache(tmp_path / "c.safetensors", cache)
    import json

    from safetensors import safe_open

    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as f:
        meta = f.metadata()
    arrays = load_file(tmp_path / "c.safetensors")
    header = json.loads(meta["refreekv"])
    name = next(k for k in arrays if k.endswith(".tail_k_scales"))
    arrays[name] = arrays[name][..., :1, :].contiguous()  # one slot of scales: the tail no longer fits together
    header["digests"][name] = refreekv.adapters.transformers._digest(arrays[name])
    save_file(arrays, str(tmp_path / "bad.safetensors"), metadata={"refreekv": json.dumps(header)})
    with pytest.raises(ReFreeKVError, match=r"^file_name: .*tail k codes"):
        load_cache(tmp_path / "bad.safetensors", model)
