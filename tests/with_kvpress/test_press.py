"""ReFreeKVPress in kvpress 0.5.5 (which needs transformers < 5.3): run by scripts/test.sh in the
second environment that scripts/install.sh makes (.venv-kvpress), on the real SmolLM2-135M."""

import gc

import numpy as np
import pytest
import torch
from transformers import DynamicCache, pipeline

import refreekv
from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv.adapters.kvpress import PressLayer, ReFreeKVPress
from refreekv.adapters.transformers import attention_modules, capture_prefill
from refreekv.commands.models import load_torch
from refreekv.commands.prompts import QUESTION, chat, needle_prompt

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smol():
    return load_torch()


@pytest.fixture(scope="module")
def pipe(smol):
    model, tok = smol
    return pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")


CONTEXT = needle_prompt(500, 0.5, number=7417, question=False)


def test_zero_threshold_gives_the_full_cache_answer(pipe):
    full = pipe(CONTEXT, question=QUESTION, max_new_tokens=16)["answer"]
    press = ReFreeKVPress(ReFreeKVConfig.evicting(threshold=0.0))
    assert pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=16)["answer"] == full
    assert press.report.layers and press.report.budget[0] > 0.95


@torch.no_grad()
def test_kept_counts_equal_compress_layers_on_the_same_queries_and_keys(smol):
    model, tok = smol
    cfg = ReFreeKVConfig.paper(query_rows=32, threshold=0.02)
    ids = tok([chat(tok, needle_prompt(400, 0.3))], return_tensors="pt")["input_ids"]
    press, cache = ReFreeKVPress(cfg), DynamicCache()
    with press(model):
        model.model(input_ids=ids, past_key_values=cache)
    pre = capture_prefill(model, ids, configs=cfg)
    mods = [c.module for c in pre.captured]
    outs = refreekv.compress_layers([c.queries(cfg.rows_needed(ids.shape[1])) for c in pre.captured],
                                    [pre.cache.layers[m.layer_idx].keys for m in mods],
                                    [pre.cache.layers[m.layer_idx].values for m in mods], cfg,
                                    layers=[m.layer_idx for m in mods], scale=[m.scaling for m in mods])
    assert [r.kept for r in press.report.layers] == [o.report.kept for o in outs]
    for layer, out in zip(cache.layers, outs):
        assert layer.keys.shape[-2] == out.keys.shape[-2]          # variable lengths, really stored
        assert torch.equal(layer.keys, out.keys) and torch.equal(layer.values, out.values)
    assert len({layer.keys.shape[-2] for layer in cache.layers}) > 2
    assert press.report.bytes_after < press.report.bytes_before
    assert 0 < press.compression_ratio < 1


def test_a_question_after_the_compressed_context_sees_the_right_tokens(smol, pipe):
    """Per-layer masks keep a multi-token question causal in layers shorter than layer 0 (SDPA):
    with them, the answer equals attending over the kept tokens only, computed without kvpress."""
    model, tok = smol
    cfg = ReFreeKVConfig.paper(query_rows=32)
    press = ReFreeKVPress(cfg)
    answer = pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=12)["answer"]
    # The same through refreekv's own transformers route: prefill, compress, then the question.
    from refreekv.adapters.transformers import ReFreeKVCache, refreekv_hooks
    ctx_ids = pipe.preprocess(CONTEXT, [QUESTION], "", 10**6)
    c_ids, q_ids = ctx_ids["context_ids"], ctx_ids["questions_ids"][0]
    cache = ReFreeKVCache(model, cfg)
    with refreekv_hooks(model):
        model(input_ids=c_ids, past_key_values=cache)
        n = c_ids.shape[1]
        out = model(input_ids=q_ids, past_key_values=cache, position_ids=torch.arange(n, n + q_ids.shape[1])[None])
        tokens = [int(out.logits[0, -1].argmax())]
        for i in range(11):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                        position_ids=torch.tensor([[n + q_ids.shape[1] + i]]))
            tokens.append(int(out.logits[0, -1].argmax()))
            if tokens[-1] == tok.eos_token_id:
                break
    assert answer == tok.decode(tokens, skip_special_tokens=True)


def test_several_questions_reuse_one_compressed_context(pipe):
    press = ReFreeKVPress(ReFreeKVConfig.paper(query_rows=32))
    questions = [QUESTION, "Who wrote the essay?"]
    both = pipe(CONTEXT, questions=questions, press=press, max_new_tokens=10)["answers"]
    one = [pipe(CONTEXT, question=q, press=press, max_new_tokens=10)["answer"] for q in questions]
    assert both == one  # kvpress trims each answer away: the second question sees the same cache


def test_mask_hooks_live_as_long_as_the_cache(smol):
    model, tok = smol
    ids = tok([chat(tok, needle_prompt(200, 0.5))], return_tensors="pt")["input_ids"]
    cache = DynamicCache()
    with ReFreeKVPress(ReFreeKVConfig.paper(query_rows=8))(model):
        model.model(input_ids=ids, past_key_values=cache)
    assert any(isinstance(layer, PressLayer) for layer in cache.layers)
    assert all(len(m._forward_pre_hooks) == 1 for m in attention_modules(model))
    del cache
    gc.collect()
    assert not any(m._forward_pre_hooks for m in attention_modules(model))
    assert not any(m._forward_hooks for m in attention_modules(model))


def test_a_batch_of_prompts_gets_one_cut_per_sample(smol):
    model, tok = smol
    tok.padding_side = "left"
    texts = [chat(tok, needle_prompt(300, 0.3)), chat(tok, "Name three colours.")]
    batch = tok(texts, return_tensors="pt", padding=True)
    press, cache = ReFreeKVPress(ReFreeKVConfig.paper(query_rows=8)), DynamicCache()
    with press(model), torch.no_grad():
        model.model(**batch, past_key_values=cache)
    for i, text in enumerate(texts):
        one, c1 = ReFreeKVPress(ReFreeKVConfig.paper(query_rows=8)), DynamicCache()
        with one(model), torch.no_grad():
            model.model(**tok([text], return_tensors="pt"), past_key_values=c1)
        got = [r.kept[i] for r in press.report.layers]
        want = [r.kept[0] for r in one.report.layers]
        assert np.abs(np.array(got) - np.array(want)).max() <= 1  # float noise of padded SDPA only


def test_a_configuration_kvpress_cannot_mask_is_refused(smol):
    model, _ = smol
    with pytest.raises(ReFreeKVError, match="retained_layers: received \\(\\)"):
        with ReFreeKVPress(ReFreeKVConfig.evicting(retained_layers=()))(model):
            pass
    with pytest.raises(ReFreeKVError, match="config: received type dict"):
        ReFreeKVPress({"threshold": 0.1})
    with pytest.raises(ReFreeKVError, match="replan: received 'history'"):
        ReFreeKVPress(ReFreeKVConfig.evicting(replan="history"))  # it would keep the prompt whole: refused, not ignored
    with pytest.raises(ReFreeKVError, match="tail_bits: received 8; expected None with the kvpress press"):
        ReFreeKVPress(ReFreeKVConfig(tail_bits=8))  # kvpress's cache would drop the tail: refused, not ignored
    assert ReFreeKVPress(ReFreeKVConfig.evicting(replan="chat")).config.replan == "chat"  # compresses the prompt, as "turns"


@torch.no_grad()
def test_a_press_that_changes_the_prompt_around_it_is_refused(smol, pipe):
    """ComposedPress: a press that compresses the sequence before ReFreeKVPress (it would plan on a pruned
    prompt) or after it (it would replace keys under the plan; it crashed inside SDPA before) is refused,
    and the model is left without hooks. ThinK, which zeroes key channels in place and keeps every token, composes."""
    from kvpress import ComposedPress, KnormPress, ThinKPress
    from transformers.cache_utils import DynamicLayer

    model, tok = smol
    full = pipe(CONTEXT, question=QUESTION, max_new_tokens=12)["answer"]
    for press, message in ((ComposedPress([KnormPress(0.3), ReFreeKVPress()]), "layer 0 holding .* when ReFreeKVPress saw it"),
                           (ComposedPress([ReFreeKVPress(), KnormPress(0.3)]), "layer 0's keys replaced after ReFreeKVPress")):
        with pytest.raises(ReFreeKVError, match=f"press: received {message}"):
            pipe(CONTEXT, question=QUESTION, press=press, max_new_tokens=12)
        assert not any(m._forward_hooks for m in attention_modules(model))
        assert pipe(CONTEXT, question=QUESTION, max_new_tokens=12)["answer"] == full
    alone = pipe(CONTEXT, question=QUESTION, press=ReFreeKVPress(), max_new_tokens=12)["answer"]
    composed = ComposedPress([ThinKPress(0.0), ReFreeKVPress()])
    assert pipe(CONTEXT, question=QUESTION, press=composed, max_new_tokens=12)["answer"] == alone

    class OtherLayer(DynamicLayer):  # e.g. a quantized layer: not the full-precision keys of the prompt
        pass

    cache = DynamicCache()
    cache.layers = [OtherLayer() for _ in cache.layers] or [OtherLayer() for _ in attention_modules(model)]
    ids = tok([chat(tok, needle_prompt(100, 0.5))], return_tensors="pt")["input_ids"]
    with pytest.raises(ReFreeKVError, match="cache: received layer 0 of type OtherLayer"):
        with ReFreeKVPress()(model):
            model.model(input_ids=ids, past_key_values=cache)


@torch.no_grad()
def test_a_copy_of_a_compressed_cache_is_masked_like_the_original(smol):
    """copy.deepcopy of a cache the press compressed (one context, several questions): a multi-token
    question on the copy gets the same per-layer masks, hence the same logits, as on the original (it
    crashed inside SDPA before); the hooks stay while any copy lives and go with the last."""
    import copy

    model, tok = smol
    ctx = tok([chat(tok, needle_prompt(300, 0.5, number=7417, question=False), open_turn=True)],
              return_tensors="pt")["input_ids"]
    q = tok([" " + QUESTION + "<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt",
            add_special_tokens=False)["input_ids"]
    cache = DynamicCache()
    with ReFreeKVPress(ReFreeKVConfig.evicting(threshold=0.05))(model):
        model(input_ids=ctx, past_key_values=cache)
    assert any(isinstance(layer, PressLayer) and layer.keys.shape[-2] < ctx.shape[1] for layer in cache.layers)
    fork, again = copy.deepcopy(cache), copy.deepcopy(cache)
    pos = torch.arange(ctx.shape[1], ctx.shape[1] + q.shape[1])[None]
    a = model(input_ids=q, past_key_values=cache, position_ids=pos).logits
    del cache
    gc.collect()
    assert all(len(m._forward_pre_hooks) == 1 for m in attention_modules(model))  # the copies still need them
    assert torch.equal(model(input_ids=q, past_key_values=fork, position_ids=pos).logits, a)
    del fork
    gc.collect()
    assert torch.equal(model(input_ids=q, past_key_values=again, position_ids=pos).logits, a)
    del again
    gc.collect()
    assert not any(m._forward_pre_hooks for m in attention_modules(model))
