"""ReFreeKV in mlx-lm on Linux CPU with the real SmolLM2-135M (float32 weights).

MLX's CPU build is slow on this machine (a 1024^3 matmul takes ~0.4 s), so prompts here are
short (~100 tokens) and generations a few tokens long.
"""

import dataclasses

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
import torch
from mlx_lm.models.cache import make_prompt_cache as plain_prompt_cache

from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv import reference as R
from refreekv.adapters.mlx_lm import (STEP, ReFreeKVCache, attach, budget_report, compress_prompt_cache, detach,
                                      load_prompt_cache, make_prompt_cache, plan_history,
                                      save_prompt_cache)
from refreekv.commands.models import load_mlx, load_torch
from refreekv.commands.prompts import chat, needle_prompt
from refreekv.testing import valid_cut_range

pytestmark = pytest.mark.model
CFG = ReFreeKVConfig.evicting(threshold=0.05)


@pytest.fixture(scope="module")
def smol():
    model, tok = load_mlx()
    yield model, tok
    detach(model)


@pytest.fixture(scope="module")
def ids(smol):
    _, tok = smol
    return tok.encode(chat(tok, needle_prompt(50, depth=0.5)))


def run(model, tok, ids, cache, max_tokens=4, **kw):
    return mlx_lm.generate(model, tok, ids, max_tokens=max_tokens, prompt_cache=cache, **kw)


def test_zero_threshold_matches_mlx_lm_kvcache(smol, ids):
    model, tok = smol
    plain = plain_prompt_cache(model)
    full = run(model, tok, ids, plain)
    cache = make_prompt_cache(model, ReFreeKVConfig(threshold=0.0))
    assert run(model, tok, ids, cache) == full
    assert [c.offset for c in cache] == [c.offset for c in plain]  # true positions, not stored counts
    # T = 0 is the full cache: every layer kept every prompt token
    assert [r.kept for r in budget_report(cache).layers] == [[len(ids)]] * len(cache)


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, query_rows=0.4)], ids=["32_rows", "fraction_of_n"])
def test_default_threshold_shrinks_storage_to_the_reference_budget(smol, ids, cfg):
    """Each layer's cut is the reference's on the prefill's own queries and keys (with a fraction
    of n as query rows, the buffer holds more rows than score: the newest must)."""
    model, tok = smol
    n = len(ids)
    # Capture each layer's post-RoPE last query and keys from a plain prefill.
    probes = attach(model)
    plain = plain_prompt_cache(model)
    model(mx.array(ids)[None], cache=plain)
    rows = cfg.rows_needed(n)
    captured = [(np.array(p._recent[0][0][:, :, -rows:]).astype(np.float64),  # (queries, their rope offset)
                 np.array(c.keys[..., :n, :]).astype(np.float64)) for p, c in zip(probes, plain)]
    cache = make_prompt_cache(model, cfg)
    model(mx.array(ids[:-1])[None], cache=cache)
    model(mx.array(ids[-1:])[None], cache=cache)  # the last prompt token: compression happens here
    report = budget_report(cache)
    for i, ((q, K), c, rep) in enumerate(zip(captured, cache, report.layers)):
        assert c.offset == n and c.stored == rep.kept[0] and c.nbytes >= rep.bytes_after
        if i in cfg.retained_layers:
            assert not rep.compressed
            continue
        lo, hi = valid_cut_range(R.plan_layer(q, K, cfg)["ratio"][0], cfg.threshold, 2e-4, cfg.sinks, n)
        assert lo <= rep.kept[0] <= hi, (i, rep.kept, lo, hi)
        assert c.keys.shape[2] == c.stored  # storage after a plan: exactly the kept tokens
    assert report.bytes_after < 0.9 * report.bytes_before
    model(mx.array(ids[-1:])[None], cache=cache)  # a decode step grows storage to the next whole step
    for i, c in enumerate(cache):
        assert c.keys.shape[2] == c.values.shape[2] == -(-c.stored // STEP) * STEP, (i, c.keys.shape, c.stored)


def test_chunked_prefill_decides_on_the_whole_prompt(smol, ids):
    model, tok = smol
    one_shot = make_prompt_cache(model, CFG)
    chunked = make_prompt_cache(model, CFG)
    a = run(model, tok, ids, one_shot, prefill_step_size=4096)
    b = run(model, tok, ids, chunked, prefill_step_size=16)
    assert a == b
    assert [r.kept for r in budget_report(one_shot).layers] == [r.kept for r in budget_report(chunked).layers]
    assert all(r.prompt_lengths == [len(ids)] for r in budget_report(chunked).layers)


def test_same_cuts_as_torch(smol, ids):
    from refreekv.adapters.transformers import ReFreeKVCache as TorchCache, refreekv_hooks

    model, _ = smol
    tmodel, _ = load_torch()
    tcache = TorchCache(tmodel, CFG)
    with refreekv_hooks(tmodel), torch.no_grad():
        tmodel(input_ids=torch.tensor([ids]), cache=tcache)
    cache = make_prompt_cache(model, CFG)
    model(mx.array(ids[:-1])[None], cache=cache)
    model(mx.array(ids[-1:])[None], cache=cache)
    mlx_kept = [r.kept[0] for r in budget_report(cache).layers]
    torch_kept = [r.kept[0] for r in tcache.report.layers]
    assert sum(a != b for a, b in zip(mlx_kept, torch_kept)) <= 1, (mlx_kept, torch_kept)


@pytest.mark.parametrize("cfg", [CFG, dataclasses.replace(CFG, replan_every=2)], ids=["turns", "replan_every"])
def test_save_and_load_restore_the_same_state(smol, ids, tmp_path, cfg):
    """After a generation, with re-planning per turn (the default) or every 2 generated tokens (whose
    buffered query rows must travel with the file), the loaded cache continues exactly."""
    model, tok = smol
    cache = make_prompt_cache(model, cfg)
    run(model, tok, ids, cache, max_tokens=3)
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, {"prompt": "needle"})
    loaded, meta = load_prompt_cache(path, model, return_metadata=True)
    assert meta == {"prompt": "needle"}
    for a, b in zip(cache, loaded):
        assert type(a) is type(b) and a.offset == b.offset and a.stored == b.stored and a.report == b.report
        assert all(mx.array_equal(x, y) for x, y in zip(a.state, b.state))
    for a, b in zip(cache, loaded):
        if isinstance(a, ReFreeKVCache):
            assert len(a._rows) == len(b._rows) and all(mx.array_equal(x, y) for x, y in zip(a._rows, b._rows))
            assert a.runs == b.runs and a.runs is not None  # the slot positions travel too (deep trims)
    turn = tok.encode(" And once more?")
    assert run(model, tok, turn, cache, max_tokens=3) == run(model, tok, turn, loaded, max_tokens=3)
    assert [c.plans for c in cache if isinstance(c, ReFreeKVCache)] == \
        [c.plans for c in loaded if isinstance(c, ReFreeKVCache)]


def test_a_tampered_or_truncated_file_loads_nothing(smol, ids, tmp_path):
    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    run(model, tok, ids, cache, max_tokens=2)
    path = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(path), cache)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-100] ^= 0x01  # one bit of the last array's data
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    import json

    arrays, meta = mx.load(str(path), return_metadata=True)
    header = json.loads(meta["refreekv"])
    runs = header["layers"][5]["runs"]
    assert len(runs) == 2  # the sinks and the newest run
    header["layers"][5]["runs"] = [[runs[1][0], runs[1][1]], [runs[0][0], runs[0][1]]]  # same counts, out of order
    mx.save_safetensors(str(tmp_path / "runs.safetensors"), arrays, metadata={"refreekv": json.dumps(header)})
    for name, why in (("cut", "unreadable"), ("flipped", "checksum"), ("missing", "unreadable"),
                      ("runs", "slot positions are not ascending")):
        with pytest.raises(ReFreeKVError, match=f"file_name: received .*{why}"):
            load_prompt_cache(str(tmp_path / f"{name}.safetensors"), model)


def test_bad_prompt_caches_models_and_paths_fail_at_the_entry(smol, ids, tmp_path):
    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    run(model, tok, ids, cache, max_tokens=2)
    for call, message in (
            (lambda: make_prompt_cache(None), "model: received type NoneType"),
            (lambda: compress_prompt_cache([]), "prompt_cache: received an empty list"),
            (lambda: compress_prompt_cache(plain_prompt_cache(model)), "prompt_cache: received mlx-lm caches "
             "without a ReFreeKV layer"),
            (lambda: budget_report(None), "prompt_cache: received type NoneType"),
            (lambda: plan_history([1, 2]), "prompt_cache: received layer 0 of class int"),
            (lambda: save_prompt_cache(str(tmp_path / "no" / "such" / "x.safetensors"), cache), "file_name: received .*unwritable"),
            (lambda: load_prompt_cache(str(tmp_path / "x.safetensors"), object()), "file_name: received .*unreadable")):
        with pytest.raises(ReFreeKVError, match=message):
            call()
    save_prompt_cache(str(tmp_path / "ok.safetensors"), cache)
    with pytest.raises(ReFreeKVError, match="model: received type object"):
        load_prompt_cache(str(tmp_path / "ok.safetensors"), object())
    # mlx-lm zips the model's layers with the list it gets: a shortened list silently runs 5 layers of 30
    # (so would a list made for a model of another depth); refused at the next call, not decoded on
    with pytest.raises(ReFreeKVError, match=r"prompt_cache: received a call that did not reach layer\(s\) \[5, 6"):
        run(model, tok, ids, make_prompt_cache(model, CFG)[:5], max_tokens=4)


def test_layers_are_planned_together(smol, ids):
    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    run(model, tok, ids, cache, max_tokens=2)
    ours = [c for c in cache if isinstance(c, ReFreeKVCache)]
    assert len({id(c.planner) for c in ours}) == 1 and len(ours[0].planner.history.plans) == 1
    assert len(ours[0].planner.history.report.layers) == len(ours)  # one plan covered every layer


def test_replanning_each_turn_at_zero_threshold_is_the_full_cache(smol):
    model, tok = smol
    turns = [chat(tok, needle_prompt(40, depth=0.5)), "<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n"]
    plain, ours = plain_prompt_cache(model), make_prompt_cache(model, ReFreeKVConfig(threshold=0.0, replan="turns"))
    for turn in turns:
        ids = tok.encode(turn, add_special_tokens=False)
        assert run(model, tok, ids, ours, max_tokens=3) == run(model, tok, ids, plain, max_tokens=3)
    assert [c.offset for c in ours] == [c.offset for c in plain]
    assert max(len(c.reports) for c in ours if isinstance(c, ReFreeKVCache)) == 2  # planned after each turn


@pytest.mark.parametrize("replan", ["history", "chat"])
def test_history_replanning_keeps_the_turn_being_answered_whole(smol, tmp_path, replan):
    """replan="history": the first prompt stays whole (its answer is the full cache's); "chat": the
    first prompt is compressed as "turns" compresses it. The next segment is planned, and every
    compressed layer keeps at least the sinks plus that whole segment (what keep_newest protects),
    through a save and load between the turns (the segment count travels with the file)."""
    model, tok = smol
    turns = [chat(tok, needle_prompt(120, depth=0.5)), "<|im_start|>user\nAnd again, in other words?<|im_end|>\n"
             "<|im_start|>assistant\n"]
    cfg = ReFreeKVConfig.evicting(threshold=0.05, replan=replan)
    plain, ours = plain_prompt_cache(model), make_prompt_cache(model, cfg)
    first = tok.encode(turns[0], add_special_tokens=False)
    layers = [c for c in ours if isinstance(c, ReFreeKVCache)]
    if replan == "history":
        assert run(model, tok, first, ours, max_tokens=3) == run(model, tok, first, plain, max_tokens=3)
        assert all(c.stored == c.offset and c.plans == 1 and not c.report.compressed for c in layers)
    else:
        turns_cache = make_prompt_cache(model, ReFreeKVConfig.evicting(threshold=0.05, replan="turns"))
        assert run(model, tok, first, ours, max_tokens=3) == run(model, tok, first, turns_cache, max_tokens=3)
        assert [c.stored for c in ours] == [c.stored for c in turns_cache]
        assert all(c.plans == 1 for c in layers) and sum(c.report.compressed for c in layers) >= 10
    save_prompt_cache(str(tmp_path / "turn1.safetensors"), ours)
    ours = load_prompt_cache(str(tmp_path / "turn1.safetensors"), model)
    second = tok.encode(turns[1], add_special_tokens=False)
    run(model, tok, second, ours, max_tokens=3)
    layers = [c for c in ours if isinstance(c, ReFreeKVCache)]
    squeezed = 0
    for c in layers:
        r = c.report
        assert c.plans == 2 and r.kept[0] < c.stored <= r.kept[0] + 4  # planned at the segment's end
        assert replan == "chat" or c.offset - 4 <= r.prompt_lengths[0] < c.offset
        if not cfg.is_retained(c.layer):
            assert r.kept[0] >= min(r.prompt_lengths[0], cfg.sinks + len(second)), (c.layer, r.kept)
            squeezed += r.compressed
    assert squeezed >= (10 if replan == "history" else 1)  # the history was compressed (again, with "chat")


def test_history_keeps_the_whole_turn_through_generation_replans(smol, ids):
    """replan="history" with replan_every: on a single prompt every plan (after the prompt, then every 4
    generated tokens) keeps everything, so the answer is the full cache's."""
    model, tok = smol
    cfg = ReFreeKVConfig.evicting(threshold=0.05, replan="history", replan_every=4)
    ours, plain = make_prompt_cache(model, cfg), plain_prompt_cache(model)
    assert run(model, tok, ids, ours, max_tokens=14) == run(model, tok, ids, plain, max_tokens=14)
    layers = [c for c in ours if isinstance(c, ReFreeKVCache)]
    assert min(c.plans for c in layers) >= 3  # the prompt, then during generation
    assert all(c.stored == c.offset and not any(r.compressed for r in c.reports) for c in layers)


def test_a_deep_copy_forks_the_chat(smol):
    """copy.deepcopy of a planned prompt cache (forking a chat; mlx-lm's LRUPromptCache hands out copies)
    continues on its own: the same next turn gives the same answer and plan on the copy as on the
    original, and continuing the copy leaves the original as it was."""
    import copy

    from mlx_lm.models.cache import LRUPromptCache

    model, tok = smol
    first = tok.encode(chat(tok, needle_prompt(60, depth=0.5)), add_special_tokens=False)
    second = tok.encode("<|im_start|>user\nAnd again?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ours = make_prompt_cache(model, dataclasses.replace(CFG, replan="turns"))
    run(model, tok, first, ours, max_tokens=3)
    fork = copy.deepcopy(ours)
    before = [(c.offset, c.stored, c.plans) for c in ours if isinstance(c, ReFreeKVCache)]
    layers = [c for c in fork if isinstance(c, ReFreeKVCache)]
    assert {id(c.planner) for c in layers} == {id(layers[0].planner)} != {id(c.planner) for c in ours}
    assert layers[0].planner.caches == layers  # the copy's planner plans the copy's layers
    answer = run(model, tok, second, fork, max_tokens=3)
    assert [(c.offset, c.stored, c.plans) for c in ours if isinstance(c, ReFreeKVCache)] == before
    assert run(model, tok, second, ours, max_tokens=3) == answer
    assert [r.kept for r in budget_report(fork).layers] == [r.kept for r in budget_report(ours).layers]
    # mlx-lm's LRU prompt cache: a cached prompt extended by a new turn comes back as a copy to continue
    lru = LRUPromptCache()
    kept = make_prompt_cache(model, dataclasses.replace(CFG, replan="turns"))
    model(mx.array(first)[None], cache=kept)  # a manual prefill: the cache holds exactly `first`
    assert compress_prompt_cache(kept).layers[5].compressed
    entry = copy.deepcopy(kept)
    lru.insert_cache("smol", first, entry)  # the server keys entries by its model name
    cache, rest = lru.fetch_nearest_cache("smol", first + second)
    assert rest == second and cache is not entry
    assert run(model, tok, rest, cache, max_tokens=3) == run(model, tok, second, kept, max_tokens=3)
    # a prompt that leaves the cached one inside it: the LRU trims a copy back to the common prefix, into
    # planned slots: the copy holds the kept slots before it, the entry itself is untouched
    held = [(k.offset, _positions(k)) for k in entry]
    cache, rest = lru.fetch_nearest_cache("smol", first[:50] + second)
    assert rest == second and all(c.offset == 50 for c in cache)
    assert all(_positions(c) == [p for p in pos if p < 50] for c, (_, pos) in zip(cache, held))
    assert [(k.offset, _positions(k)) for k in entry] == held


def test_speculative_decoding_plans_the_main_model_at_the_first_rewind(smol, ids):
    """mlx-lm's draft_model verifies drafts in multi-token calls and then trims the rejected ones, so the
    main model never makes the one-token call that ends a prompt: its cache is planned at the first trim
    (the prompt and the accepted tokens), once, and the rejected drafts never reach planned slots. At
    T = 0 the text is mlx-lm's own speculative decoding's."""
    from refreekv.commands.models import exported_model_dir

    model, tok = smol
    draft, _ = mlx_lm.load(str(exported_model_dir()))  # a second copy of the model as its own draft
    try:
        kw = dict(max_tokens=10, draft_model=draft)
        plain = mlx_lm.generate(model, tok, ids, prompt_cache=plain_prompt_cache(model) + plain_prompt_cache(draft), **kw)
        zero = ReFreeKVConfig(threshold=0.0)
        assert mlx_lm.generate(model, tok, ids, prompt_cache=make_prompt_cache(model, zero) +
                               make_prompt_cache(draft, zero), **kw) == plain
        main, small = make_prompt_cache(model, CFG), make_prompt_cache(draft, CFG)
        mlx_lm.generate(model, tok, ids, prompt_cache=main + small, **kw)
        for cache in (main, small):
            layers = [c for c in cache if isinstance(c, ReFreeKVCache)]
            assert all(c.plans == 1 for c in layers)  # planned once: after the prompt, not at every verification
            assert sum(c.report.compressed for c in layers) >= 10
            assert all(c.report.prompt_lengths[0] >= len(ids) for c in layers)
    finally:
        detach(draft)


def _positions(layer) -> list[int]:
    return [p for start, count in layer.runs for p in range(start, start + count)]


def test_trim_is_exact_or_refused(smol, ids):
    """Tokens added since the plan go exactly; a trim into planned slots drops the kept slots at the
    trimmed positions (the rest stays as planned); a ranking whose kept set is not tracked refuses it."""
    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    run(model, tok, ids, cache, max_tokens=4)
    layer = cache[5]
    before = (layer.offset, layer.stored)
    kept = _positions(layer)
    assert kept == sorted(set(kept)) and len(kept) == layer.stored and kept[-1] == layer.offset - 1
    assert kept[:CFG.sinks] == list(range(CFG.sinks)) and layer.stored < layer.offset  # sinks + a newest run
    assert layer.trim(2) == 2 and (layer.offset, layer.stored) == (before[0] - 2, before[1] - 2)
    keys = np.array(layer.keys[..., :layer.stored, :])
    deep = layer.offset - (len(ids) - 10)  # back to 10 prompt tokens before the plan's end
    assert layer.trim(deep) == deep and layer.offset == len(ids) - 10
    assert _positions(layer) == [p for p in kept if p < len(ids) - 10] and layer.stored == len(_positions(layer))
    np.testing.assert_array_equal(np.array(layer.keys[..., :layer.stored, :]), keys[..., :layer.stored, :])
    # the positions are right: post-RoPE keys name their position, and a plain prefill holds every one
    plain = plain_prompt_cache(model)
    model(mx.array(ids)[None], cache=plain)
    full_keys = np.array(plain[5].keys[..., :len(ids), :])
    np.testing.assert_allclose(np.array(layer.keys[..., :layer.stored, :]), full_keys[..., _positions(layer), :],
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ReFreeKVError, match="trim: received -1"):
        layer.trim(-1)
    snap = make_prompt_cache(model, dataclasses.replace(CFG, ranking="snapkv"))
    run(model, tok, ids, snap, max_tokens=4)
    assert snap[5].runs is None
    with pytest.raises(ReFreeKVError, match="trim: received 50; expected at most .* ranking='snapkv'"):
        snap[5].trim(50)


def test_a_trimmed_cache_answers_as_the_shorter_prompt(smol, ids):
    """What mlx-lm's LRUPromptCache (and so mlx_lm.server) does to regenerate an answer or to take a
    prompt that leaves a cached conversation early: trim, then feed the rest. Regenerating gives the
    same answer; at T = 0 a trim deep into the planned prompt and a new ending give the full cache's."""
    from mlx_lm.models.cache import trim_prompt_cache

    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    first = run(model, tok, ids, cache, max_tokens=6)
    trim_prompt_cache(cache, cache[0].offset - (len(ids) - 1))  # the server's regenerate: back to the prompt minus one
    assert run(model, tok, ids[-1:], cache, max_tokens=6) == first
    other = ids[:-12] + tok.encode(" Say it again, please.")
    cache = make_prompt_cache(model, ReFreeKVConfig(threshold=0.0))
    run(model, tok, ids, cache, max_tokens=4)
    trim_prompt_cache(cache, cache[0].offset - (len(ids) - 12))
    assert run(model, tok, other[len(ids) - 12:], cache, max_tokens=6) == run(
        model, tok, other, plain_prompt_cache(model), max_tokens=6)
    assert all(c.plans == 2 for c in cache if isinstance(c, ReFreeKVCache))  # the new ending was planned


def test_batching_and_quantization_are_refused_loudly(smol, ids):
    model, tok = smol
    cache = make_prompt_cache(model, CFG)
    from mlx_lm.generate import _merge_caches

    assert not hasattr(cache[5], "merge")  # mlx-lm's protocol: mlx_lm.server serves one request at a time
    with pytest.raises(ValueError, match="ReFreeKVCache'> does not yet support batching"):
        _merge_caches([cache, cache])  # what mlx-lm's batched generation calls
    with pytest.raises(ReFreeKVError, match="keys: received batch 2"):
        model(mx.array([ids[:8], ids[:8]]), cache=cache)
    with pytest.raises(ReFreeKVError, match="kv_bits: received 4"):
        run(model, tok, ids[:12], make_prompt_cache(model, CFG), kv_bits=4, quantized_kv_start=0)


def test_detached_model_is_refused(smol, ids):
    model, _ = smol
    cache = make_prompt_cache(model, CFG)
    detach(model)
    try:
        with pytest.raises(ReFreeKVError, match="model: received no captured queries"):
            model(mx.array(ids[:8])[None], cache=cache)
    finally:
        attach(model)


def test_manual_prefill_then_compress(smol, ids):
    model, _ = smol
    cache = make_prompt_cache(model, CFG)
    model(mx.array(ids)[None], cache=cache)
    report = compress_prompt_cache(cache)
    assert all(r.prompt_lengths == [len(ids)] for r in report.layers)
    assert report.bytes_after < report.bytes_before


def test_a_segment_of_at_most_sinks_tokens_is_appended_without_a_plan(smol, ids):
    model, tok = smol
    cache = make_prompt_cache(model, CFG)  # replan="turns", 4 sinks
    run(model, tok, ids, cache, max_tokens=2)
    ours = [c for c in cache if isinstance(c, ReFreeKVCache)]
    plans, stored = ours[0].planner.history.plans[:], [c.stored for c in ours]
    words = tok.encode(" And now tell me about the essay, please.")
    assert len(words) > 5
    run(model, tok, words[:4], cache, max_tokens=2)  # a segment of exactly `sinks` tokens: no plan
    assert len(ours[0].planner.history.plans) == len(plans)
    assert all(c.stored > s for c, s in zip(ours, stored))  # appended, nothing evicted
    run(model, tok, words[:5], cache, max_tokens=2)  # sinks + 1 tokens: planned
    assert len(ours[0].planner.history.plans) == len(plans) + 1


def test_queries_rotated_after_the_cache_update_are_refused_not_taken_stale(smol, ids, monkeypatch):
    """Some mlx-lm models rotate the keys, update the cache, and only then rotate the queries (gemma3n's
    order): at the update the probe holds no queries of this call. The cache raises instead of
    scoring with anything else (the offset rule below also refuses a previous call's queries)."""
    from mlx_lm.models import llama
    from mlx_lm.models.base import scaled_dot_product_attention

    model, tok = smol

    def keys_first(self, x, mask=None, cache=None):
        B, L, _ = x.shape
        queries = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset
        keys = self.rope(keys, offset=offset)
        keys, values = cache.update_and_fetch(keys, values)
        queries = self.rope(queries, offset=offset)
        out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    cache = make_prompt_cache(model, dataclasses.replace(CFG, replan_every=2))
    model(mx.array(ids[:1])[None], cache=cache)  # normal order: fine
    monkeypatch.setattr(llama.Attention, "__call__", keys_first)
    with pytest.raises(ReFreeKVError, match="model: received no captured queries"):
        model(mx.array(ids[1:2])[None], cache=cache)  # one token, same shapes as the previous call's queries


def test_the_probe_gives_queries_only_when_both_were_rotated_at_this_calls_offset():
    from refreekv.adapters.mlx_lm import QueryProbe

    probe = QueryProbe(lambda x, offset=0: x, 0.125)  # rotation itself does not matter here: identity
    q, k = mx.zeros((1, 4, 1, 8)), mx.ones((1, 2, 1, 8))
    probe(q, offset=7), probe(k, offset=7)
    assert probe.take_queries(k, 7) is q
    probe(q, offset=6), probe(k, offset=7)  # queries of the previous step (same shape) and this step's keys
    assert probe.take_queries(k, 7) is None
    probe(q, 7), probe(k, 7)  # offset passed positionally
    assert probe.take_queries(k, 7) is q
    probe(q, offset=mx.array(7)), probe(k, offset=mx.array(7))  # an array offset
    assert probe.take_queries(k, 7) is q
    mha = mx.ones((1, 4, 1, 8))  # as many KV heads as query heads: shapes cannot tell queries from keys
    probe(mha, offset=7), probe(q, offset=7)  # keys rotated first, then the queries (gemma4_text's order)
    assert probe.take_queries(mha, 7) is None
    probe(k, offset=7)  # keys alone: nothing to take
    assert probe.take_queries(k, 7) is None
    probe(q, offset=7), probe(mx.ones((1, 2, 3, 8)), offset=7)  # the second output is not these keys
    assert probe.take_queries(k, 7) is None


def test_the_probe_keeps_each_threads_rotations_apart():
    """Two generations on one model in two threads: another thread's rotations, made between this
    thread's keys and its cache update (same shapes, same offset), are not taken as this thread's
    queries."""
    import copy
    import threading

    from refreekv.adapters.mlx_lm import QueryProbe

    probe = QueryProbe(lambda x, offset=0: x, 0.125)
    qa, ka = mx.zeros((1, 4, 5, 8)), mx.ones((1, 2, 5, 8))
    qb, kb = mx.full((1, 4, 5, 8), 2.0), mx.full((1, 2, 5, 8), 3.0)
    rotated, go, seen = threading.Event(), threading.Event(), []

    def other_generation():
        probe(qb, offset=0), probe(kb, offset=0)
        rotated.set()
        go.wait(10)
        seen.append(probe.take_queries(kb, 0))

    probe(qa, offset=0), probe(ka, offset=0)  # this thread: queries, keys ...
    other = threading.Thread(target=other_generation)
    other.start()
    assert rotated.wait(10)  # ... the other thread's queries and keys in between ...
    assert probe.take_queries(ka, 0) is qa  # ... then this thread's cache update takes its own
    go.set()
    other.join(10)
    assert len(seen) == 1 and seen[0] is qb  # and the other thread still finds its own
    twin = copy.deepcopy(probe)  # a copied model gets its own probe around a copy of the rope
    assert isinstance(twin, QueryProbe) and twin is not probe and twin.scale == probe.scale


def test_decoding_after_a_plan_continues_at_true_positions_as_torch_does(smol, ids):
    """With a fixed budget both engines keep exactly the same positions; the next tokens' logits,
    teacher-forced over several steps after the plan, then agree between MLX and torch (a position
    counted from the stored slots instead of the tokens seen rotates them elsewhere), and every
    cache's offset counts the tokens seen."""
    from refreekv.adapters.transformers import ReFreeKVCache as TorchCache, refreekv_hooks

    cfg = ReFreeKVConfig.evicting(halting="ratio", budget=0.5)
    model, _ = smol
    tmodel, _ = load_torch()
    tcache = TorchCache(tmodel, cfg)
    with refreekv_hooks(tmodel), torch.no_grad():
        t_logits = [tmodel(input_ids=torch.tensor([ids]), cache=tcache).logits[0, -1]]
        forced = [int(t_logits[0].argmax())]
        for _ in range(5):
            t_logits.append(tmodel(input_ids=torch.tensor([[forced[-1]]]), cache=tcache).logits[0, -1])
            forced.append(int(t_logits[-1].argmax()))
    cache = make_prompt_cache(model, cfg)
    model(mx.array(ids[:-1])[None], cache=cache)
    m_logits = [model(mx.array(ids[-1:])[None], cache=cache)[0, -1]]
    assert any(c.stored < len(ids) for c in cache)
    for step, tok_id in enumerate(forced[:-1], 1):
        m_logits.append(model(mx.array([[tok_id]]), cache=cache)[0, -1])
        assert all(c.offset == len(ids) + step for c in cache)
    for step, (a, b) in enumerate(zip(t_logits, m_logits)):
        np.testing.assert_allclose(np.array(b), a.numpy(), atol=2e-3, rtol=0, err_msg=f"step {step}")


@pytest.mark.parametrize("entry", ["server", "chat"])
def test_server_and_chat_caches_switch_on_and_off_cleanly(entry):
    import importlib

    from refreekv.adapters import mlx_lm as ours

    module = importlib.import_module(f"mlx_lm.{entry}")
    switch = {"server": ours.server_caches, "chat": ours.chat_caches}[entry]
    own = module.make_prompt_cache
    with switch(CFG):
        assert module.make_prompt_cache is not own
        with pytest.raises(ReFreeKVError, match=f"mlx_lm.{entry}: received make_prompt_cache = <function"):
            with switch():
                pass
        with pytest.raises(ReFreeKVError, match="max_kv_size: received 100"):
            module.make_prompt_cache(None, 100)
    assert module.make_prompt_cache is own
    with pytest.raises(RuntimeError, match="inside"):
        with switch():
            raise RuntimeError("inside")
    assert module.make_prompt_cache is own
    with pytest.raises(ReFreeKVError, match="config: received type dict"):
        with switch({"threshold": 0.1}):
            pass
    assert module.make_prompt_cache is own


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(port: int, messages: list, max_tokens: int = 8) -> tuple[str, int]:
    import json
    import urllib.request

    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.load(r)
    return out["choices"][0]["message"]["content"], out["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_mlx_lm_server_serves_a_chat_with_refreekv_caches(tmp_path):
    """mlx_lm.server itself, run by `refreekv serve`, next to a plain mlx_lm.server: a question, the same
    question again (the server trims its cached conversation back into the planned prompt and
    regenerates), and a second turn (it extends the cached conversation, which is planned again). At
    T = 0 every answer is the plain server's; with the default the plans are logged and keep less."""
    import subprocess
    import sys
    import time
    import urllib.request

    from refreekv.commands.models import exported_model_dir

    model_dir = str(exported_model_dir())
    commands = {"plain": [sys.executable, "-m", "mlx_lm", "server", "--model", model_dir],
                "T=0": [sys.executable, "-m", "refreekv.cli", "serve", "--threshold", "0", "--"],
                "default": [sys.executable, "-m", "refreekv.cli", "serve", "--"]}
    ports, procs, logs = {}, {}, {}
    try:
        for name, cmd in commands.items():
            ports[name] = _free_port()
            logs[name] = tmp_path / f"{name}.log"
            procs[name] = subprocess.Popen(cmd + ["--port", str(ports[name])], stdout=logs[name].open("w"),
                                           stderr=subprocess.STDOUT)
        for name, port in ports.items():
            deadline = time.time() + 240
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).close()
                    break
                except OSError:
                    assert procs[name].poll() is None, logs[name].read_text()[-3000:]
                    assert time.time() < deadline, f"{name} did not start: " + logs[name].read_text()[-3000:]
                    time.sleep(1)
        first = [{"role": "user", "content": "My locker code is 4417 and my bike is red. What is my locker code?"}]
        answers = {}
        for name, port in ports.items():
            a1, cached1 = _ask(port, first)
            a2, cached2 = _ask(port, first)  # regenerate: the cached conversation is trimmed back into the prompt
            second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And the bike?"}]
            a3, cached3 = _ask(port, second)
            answers[name] = (a1, a2, a3)
            assert cached1 == 0 and cached2 > 0 and cached3 > 0, (name, cached1, cached2, cached3)
        assert answers["T=0"] == answers["plain"]
        assert answers["default"][1] == answers["default"][0]  # regenerating gives the same answer
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(30)
    for name in ("T=0", "default"):
        plans = [line for line in logs[name].read_text().splitlines() if "refreekv: planned 30 layers" in line]
        assert len(plans) == 2, logs[name].read_text()[-3000:]  # the first prompt, then the second turn
    budgets = [float(line.split("budget ")[1].split("%")[0]) for line in logs["default"].read_text().splitlines()
               if "refreekv: planned" in line]
    assert all(b < 100 for b in budgets) and "budget 100.0%" in logs["T=0"].read_text()


def test_mlx_lm_chat_follows_the_conversation_with_a_refreekv_cache():
    """mlx-lm's terminal chat itself, run by `refreekv chat`, next to a plain `mlx_lm chat`: two turns, a reset
    (`r`), one more turn. At T = 0 the transcript is the plain chat's; each turn is planned (the reset makes a
    fresh cache, so its plan covers that turn alone); with the default the plans keep less."""
    import re
    import subprocess
    import sys

    from refreekv.commands.models import exported_model_dir

    typed = ("My locker code is 4417 and my bike is red. What is my locker code?\nWhat colour is my bike?\n"
             "r\nName a fruit that is yellow.\nq\n")
    opts = ["--max-tokens", "20"]
    commands = {"plain": [sys.executable, "-m", "mlx_lm", "chat", "--model", str(exported_model_dir()), *opts],
                "T=0": [sys.executable, "-m", "refreekv.cli", "chat", "--threshold", "0", "--", *opts],
                "default": [sys.executable, "-m", "refreekv.cli", "chat", "--", *opts]}
    procs = {name: subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in commands.items()}
    out = {name: p.communicate(typed, timeout=600) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, (name, out[name][1][-3000:])

    def transcript(text):  # without colours and the speed lines, which differ run to run
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
        return [line for line in text.splitlines() if "tok/s" not in line]

    plain = transcript(out["plain"][0])
    assert sum("context cleared" in line for line in plain) == 1 and plain[-1].strip() == "bye"
    assert transcript(out["T=0"][0]) == plain
    plans = {}
    for name in ("T=0", "default"):
        found = re.findall(r"refreekv: planned 30 layers at (\d+) tokens: budget ([\d.]+)%", out[name][1])
        assert len(found) == 3, out[name][1][-3000:]  # one plan per turn
        plans[name] = [(int(n), float(b)) for n, b in found]
        (n1, _), (n2, _), (n3, _) = plans[name]
        assert n1 < n2 and n3 < n2 - n1, plans  # the second turn extends the first; the reset starts over
    assert all(b == 100.0 for _, b in plans["T=0"]) and all(b < 100 for _, b in plans["default"])


def _tail_positions(layer) -> list[int]:
    return [p + j for p, c in layer.tail_runs for j in range(c)]


@pytest.mark.parametrize("bits", [8, 4])
def test_a_tail_cache_is_the_full_cache_with_its_evicted_positions_quantized(smol, ids, bits):
    """``tail_bits``: every position a plan evicts is in the tail (with its true position), and the next
    token's logits equal mlx-lm's full cache with exactly those positions quantize-dequantized."""
    import refreekv

    model, _ = smol
    cfg = ReFreeKVConfig.paper(tail_bits=bits)
    cache = make_prompt_cache(model, cfg)
    model(mx.array(ids)[None], cache=cache)
    compress_prompt_cache(cache)
    plain = plain_prompt_cache(model)
    model(mx.array(ids)[None], cache=plain)
    assert any(c.tail_slots for c in cache)
    for c, p in zip(cache, plain):
        tail = _tail_positions(c) if c.tail is not None else []
        assert c.tail_slots == len(tail) == c.offset - c.stored  # nothing evicted is dropped
        assert sorted(tail + _positions(c)) == list(range(len(ids)))
        if tail:
            sel = mx.array(tail)
            for name in ("keys", "values"):
                x = getattr(p, name)
                q = refreekv.dequantize(refreekv.quantize(x[:, :, sel], bits=bits))
                x[:, :, sel] = q
    nxt = mx.array([[ids[-1]]])
    got, want = model(nxt, cache=cache), model(nxt, cache=plain)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=2e-4, rtol=0)


def test_a_tail_travels_through_save_load_and_trims_with_its_positions(smol, ids, tmp_path):
    model, tok = smol
    cfg = ReFreeKVConfig.paper(tail_bits=8)
    cache = make_prompt_cache(model, cfg)
    run(model, tok, ids, cache, max_tokens=3)
    path = str(tmp_path / "tail.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path, model)
    for a, b in zip(cache, loaded):
        assert a.tail_runs == b.tail_runs and a.tail_slots == b.tail_slots
        assert all(mx.array_equal(x, y) for x, y in zip(a.state, b.state))  # the tail's arrays included
    turn = tok.encode(" And once more?")
    assert run(model, tok, turn, cache, max_tokens=3) == run(model, tok, turn, loaded, max_tokens=3)
    layer = next(c for c in loaded if c.tail_slots)
    before = _tail_positions(layer)
    cut = before[len(before) // 2]  # back into the middle of the tail
    layer.trim(layer.offset - cut)
    assert _tail_positions(layer) == [p for p in before if p < cut] and layer.offset == cut
    assert layer.tail_slots == len(_tail_positions(layer)) and sorted(_tail_positions(layer) + _positions(layer)) == \
        list(range(cut))
