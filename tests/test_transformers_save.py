"""Saving a transformers ReFreeKVCache between calls and loading it back: the loaded cache is the
saved one (every layer's tensors and bookkeeping, every plan's report) and continues the chat as
the unsaved cache does; a damaged file, another model or a cache that cannot be saved is one
ReFreeKVError naming the argument."""

import copy

import pytest
import torch
from transformers import DynamicCache

from refreekv import ReFreeKVConfig, ReFreeKVError
from refreekv.adapters import transformers as T
from refreekv.adapters.transformers import ReFreeKVCache, attention_modules, load_cache, refreekv_hooks, save_cache
from refreekv.commands.models import load_torch
from refreekv.commands.prompts import needle_prompt

pytestmark = pytest.mark.model
FIRST = needle_prompt(300, 0.3, number=4321, question=False)
LATER = ["Say it in one short sentence.", "What was the magic number?"]


@pytest.fixture(scope="module")
def smol():
    return load_torch()


def turn(model, tok, cache, messages, text, max_new_tokens=10):
    messages = messages + [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with refreekv_hooks(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                             max_new_tokens=max_new_tokens, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return messages + [{"role": "assistant", "content": answer}], answer


def same_state(a: ReFreeKVCache, b: ReFreeKVCache) -> None:
    """Every layer's attributes (tensors by value, dtype and device included), the cache's bookkeeping
    and every plan's report are equal."""
    assert len(a.layers) == len(b.layers)
    for i, (x, y) in enumerate(zip(a.layers, b.layers)):
        assert type(x) is type(y) and set(x.__dict__) == set(y.__dict__), i
        for name, v in x.__dict__.items():
            w = y.__dict__[name]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype and v.device == w.device and torch.equal(v, w), (i, name)
            else:
                assert v == w, (i, name, v, w)
    for name in ("_turn", "_segments", "_since_plan", "_start", "planned_layers", "refreekv_config", "fingerprint"):
        assert getattr(a, name) == getattr(b, name), name
    assert [p.to_dict() for p in a.history.plans] == [p.to_dict() for p in b.history.plans]
    assert a.get_seq_length() == b.get_seq_length()
    assert sorted(a._generated) == sorted(b._generated)
    for idx, rows in a._generated.items():
        for r, s in zip(rows, b._generated[idx], strict=True):
            assert r[0] is s[0] and all(torch.equal(u, v) for u, v in zip(r[1:], s[1:]))


@pytest.mark.parametrize("config", [ReFreeKVConfig(), ReFreeKVConfig.evicting(replan="history"),
                                    ReFreeKVConfig.evicting(replan_every=4)], ids=["turns", "history", "replan_every"])
def test_a_chat_saved_between_turns_continues_as_the_unsaved_one(smol, tmp_path, config):
    model, tok = smol
    cache = ReFreeKVCache(model, config)
    messages, _ = turn(model, tok, cache, [], FIRST)
    save_cache(tmp_path / "chat.safetensors", cache, {"chat": "one"})
    loaded, meta = load_cache(tmp_path / "chat.safetensors", model, return_metadata=True)
    assert meta == {"chat": "one"}
    same_state(cache, loaded)
    if config.replan_every:
        assert loaded._generated  # rows of generated tokens not planned yet travel with the file
    for text in LATER:  # both go on; each turn gives the same answer and the same cache
        m1, a1 = turn(model, tok, cache, messages, text)
        _, a2 = turn(model, tok, loaded, messages, text)
        assert a1 == a2
        messages = m1
        for x, y in zip(cache.layers, loaded.layers):
            assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
        assert [[r.kept for r in p.layers] for p in cache.history.plans] == \
            [[r.kept for r in p.layers] for p in loaded.history.plans]


def test_at_zero_threshold_a_chat_saved_and_loaded_at_every_turn_is_the_full_cache_chat(smol, tmp_path):
    model, tok = smol
    full, messages, answers = DynamicCache(config=model.config), [], []
    for text in [FIRST, *LATER]:
        messages, a = turn(model, tok, full, messages, text)
        answers.append(a)
    cache, messages = ReFreeKVCache(model, ReFreeKVConfig(threshold=0.0)), []
    for i, text in enumerate([FIRST, *LATER]):
        messages, a = turn(model, tok, cache, messages, text)
        assert a == answers[i]
        save_cache(tmp_path / f"turn{i}.safetensors", cache)
        cache = load_cache(tmp_path / f"turn{i}.safetensors", model)
    assert len(cache.history.plans) == 3


def test_sliding_window_layers_round_trip(tmp_path):
    """Gemma-3 (a small random model): its sliding-window layers are transformers' own, saved through
    their attributes, and the loaded cache decodes as the saved one."""
    from tests.test_transformers import tiny

    model = tiny("gemma3")
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(1))
    cache = ReFreeKVCache(model, ReFreeKVConfig.evicting(threshold=0.3, retained_layers=()))
    with refreekv_hooks(model), torch.no_grad():
        model(input_ids=ids, cache=cache)
    save_cache(tmp_path / "g.safetensors", cache)
    loaded = load_cache(tmp_path / "g.safetensors", model)
    same_state(cache, loaded)
    assert any(getattr(layer, "is_sliding", False) for layer in loaded.layers)
    nxt = torch.tensor([[5]])
    with refreekv_hooks(model), torch.no_grad():
        a = model(input_ids=nxt, cache=cache).logits
        b = model(input_ids=nxt, cache=loaded).logits
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def saved(smol, tmp_path_factory):
    model, tok = smol
    cache = ReFreeKVCache(model, ReFreeKVConfig())
    turn(model, tok, cache, [], FIRST, max_new_tokens=3)
    path = tmp_path_factory.mktemp("saved") / "c.safetensors"
    save_cache(path, cache)
    return path


def test_a_damaged_file_loads_nothing(smol, saved, tmp_path):
    model, _ = smol
    data = saved.read_bytes()
    header = int.from_bytes(data[:8], "little")
    bad = {"truncated.safetensors": data[: len(data) // 2],
           "flipped.safetensors": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],  # one bit of a tensor
           "format.safetensors": data.replace(b"refreekv-transformers-cache/1", b"refreekv-transformers-cache/9"),
           "empty.safetensors": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))  # a safetensors file, not ours
    for name in [*bad, "other.safetensors", "missing.safetensors"]:
        with pytest.raises(ReFreeKVError, match=r"^file_name: .*nothing was loaded"):
            load_cache(tmp_path / name, model)
    assert header > 0


def test_a_cache_loads_only_into_the_model_it_was_saved_from(smol, saved):
    model, _ = smol
    from tests.test_transformers import tiny

    with pytest.raises(ReFreeKVError, match=r"^model: .*layers 30 \(this model: 6\)"):
        load_cache(saved, tiny("qwen2"))
    other = copy.deepcopy(model)  # the same shapes, another checkpoint
    with torch.no_grad():
        attention_modules(other)[0].k_proj.weight[0, 0] += 1e-3
    with pytest.raises(ReFreeKVError, match=r"^model: received a model other .*weights"):
        load_cache(saved, other)
    with pytest.raises(ReFreeKVError, match=r"^model: .*dtype 'float32' \(this model: 'bfloat16'\)"):
        load_cache(saved, other.to(torch.bfloat16))
    assert load_cache(saved, model).get_seq_length() > 0


def test_what_cannot_be_saved_is_refused_by_name(smol, tmp_path):
    model, tok = smol
    with pytest.raises(ReFreeKVError, match=r"^cache: received type DynamicCache"):
        save_cache(tmp_path / "x.safetensors", DynamicCache(config=model.config))
    cache = ReFreeKVCache(model, ReFreeKVConfig())
    turn(model, tok, cache, [], FIRST, max_new_tokens=2)
    with pytest.raises(ReFreeKVError, match=r"^metadata: "):
        save_cache(tmp_path / "x.safetensors", cache, {"n": 1})
    with pytest.raises(ReFreeKVError, match=r"^file_name: .*unwritable"):
        save_cache(tmp_path / "no" / "such" / "x.safetensors", cache)
    # a call that failed inside a layer leaves the cache part-way: refused, not saved as it is
    k_proj = attention_modules(model)[7].k_proj

    def boom(*a, **k):
        raise RuntimeError("inside the layer")

    handle = k_proj.register_forward_pre_hook(boom)
    try:
        with refreekv_hooks(model), torch.no_grad(), pytest.raises(RuntimeError, match="inside the layer"):
            model(input_ids=torch.tensor([[42]]), cache=cache)
    finally:
        handle.remove()
    with pytest.raises(ReFreeKVError, match=r"^cache: .*different lengths"):
        save_cache(tmp_path / "x.safetensors", cache)
    assert not (tmp_path / "x.safetensors").exists()


def test_the_file_is_safetensors_without_pickle(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        assert f.metadata()["refreekv"].startswith("{") and all(k.split(".")[0].isdigit() for k in f.keys())
    assert T.FORMAT == "refreekv-transformers-cache/1"
