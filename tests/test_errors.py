"""Bad input gets one ReFreeKVError at the entry point: argument, received, expected."""

import numpy as np
import pytest

import refreekv
from refreekv import ReFreeKVConfig, ReFreeKVError, builtin_backend
from refreekv.testing import Target, check_errors


@pytest.mark.parametrize("kwargs,argument", [
    ({"threshold": 1.0}, "threshold"), ({"threshold": -0.1}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"threshold": True}, "threshold"), ({"sinks": -1}, "sinks"), ({"sinks": 2.5}, "sinks"),
    ({"retained_layers": (0, -1)}, "retained_layers"), ({"retained_layers": "01"}, "retained_layers"),
    ({"norm_scope": "heads"}, "norm_scope"), ({"query_rows": 0}, "query_rows"), ({"query_rows": 1.5}, "query_rows"),
    ({"ranking": "random"}, "ranking"), ({"window": 0}, "window"), ({"pool_kernel": 4}, "pool_kernel"),
    ({"halting": "ratio"}, "budget"), ({"halting": "ratio", "budget": 1.5}, "budget"),
    ({"halting": "count", "budget": 0.5}, "budget"), ({"budget": 0.5}, "budget"), ({"halting": "never"}, "halting"),
    ({"replan": "always"}, "replan"), ({"replan": "history", "ranking": "snapkv"}, "replan"),
    ({"replan": "chat", "ranking": "h2o"}, "replan"),
])
def test_config_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ReFreeKVError) as info:
        ReFreeKVConfig(**kwargs)
    msg = str(info.value)
    assert msg.startswith(argument + ": received ") and "; expected " in msg


def test_retained_layers_out_of_range():
    with pytest.raises(ReFreeKVError, match=r"retained_layers: received \(0, 1, 40\); expected indices below"):
        ReFreeKVConfig(retained_layers=(0, 1, 40)).check_layers(30)


@pytest.mark.parametrize("name,dtype", [("numpy", "float32"), ("numpy", "float64"), ("torch", "bfloat16"),
                                        ("mlx", "float16")])
def test_bad_arrays_raise_project_error(name, dtype):
    check_errors(Target(builtin_backend(name), (dtype,)), dtype)


def test_messages_say_what_was_received_and_expected():
    q, K = np.zeros((1, 3, 1, 8)), np.zeros((1, 2, 10, 8))
    with pytest.raises(ReFreeKVError) as info:
        refreekv.plan_layer(q, K)
    assert str(info.value) == ("q_rows: received 3 query heads with 2 KV heads; expected a number of query "
                               "heads that is a multiple of the KV heads (GQA)")
    with pytest.raises(ReFreeKVError, match="keys: received NaN or infinite values"):
        refreekv.plan_layer(np.zeros((1, 2, 1, 8)), np.full((1, 2, 10, 8), np.nan), ReFreeKVConfig.paper())
    with pytest.raises(ReFreeKVError, match=r"q_rows: received 1 query rows; expected at least 10"):
        refreekv.plan_layer(np.zeros((1, 2, 1, 8)), np.zeros((1, 2, 10, 8)), ReFreeKVConfig.evicting())  # 32 rows
    with pytest.raises(ReFreeKVError, match="array: received an object of type builtins.list"):
        refreekv.get_backend([1.0])
    with pytest.raises(ReFreeKVError, match="config: received type dict"):
        refreekv.plan_layer(np.zeros((1, 2, 1, 8)), np.zeros((1, 2, 10, 8)), {"threshold": 0.1})


def test_keep_newest_is_checked_at_the_entry_point():
    rng = np.random.default_rng(1)
    q, K, V = rng.normal(size=(2, 2, 1, 8)), rng.normal(size=(2, 2, 30, 8)), rng.normal(size=(2, 2, 30, 8))
    cfg = ReFreeKVConfig.paper()
    with pytest.raises(ReFreeKVError, match=r"keep_newest: received \[-1, 3\]; expected counts >= 0"):
        refreekv.plan_layer(q, K, cfg, keep_newest=[-1, 3])
    with pytest.raises(ReFreeKVError, match=r"keep_newest: received shape \(3,\) dtype int64; expected \(2,\) ints"):
        refreekv.compress_layer(q, K, V, cfg, keep_newest=np.array([1, 2, 3]))
    with pytest.raises(ReFreeKVError, match=r"keep_newest: received \[2, 2\]; expected None or 0 with ranking='pooled'"):
        refreekv.compress_layers([q], [K], [V], ReFreeKVConfig.paper(ranking="pooled"), keep_newest=2)
    with pytest.raises(ReFreeKVError, match=r"keep_newest: received 2.5"):
        refreekv.plan_layer(q, K, cfg, keep_newest=2.5)


def test_short_prompts_are_returned_unchanged_with_a_reason():
    q, K, V = np.ones((1, 2, 1, 4)), np.ones((1, 1, 5, 4)), np.ones((1, 1, 5, 4))
    k2, v2, valid, report, tail = refreekv.compress_layer(q, K, V, ReFreeKVConfig(sinks=4), layer=3)
    assert valid is None and tail is None
    assert k2 is K and v2 is V
    assert not report.compressed and report.reason == "prompt too short (n <= sinks + 1 = 5)"
    k2, _, _, report, _ = refreekv.compress_layer(q, np.ones((1, 1, 50, 4)), np.ones((1, 1, 50, 4)), layer=1)  # no rows needed
    assert not report.compressed and report.reason == "retained layer"


def test_several_layers_are_checked_layer_by_layer():
    q, K = np.zeros((1, 2, 1, 8)), np.zeros((1, 2, 10, 8))
    with pytest.raises(ReFreeKVError, match=r"q_rows: received 1 layers; expected a list of 2 arrays, one per layer of keys"):
        refreekv.plan_layers([q], [K, K])
    with pytest.raises(ReFreeKVError, match=r"keys\[1\]: received layer 1 with q_rows \(1, 2, 1, 8\) and keys \(1, 2, 9, 8\)"):
        refreekv.plan_layers([q, q], [K, K[:, :, 1:]])
    with pytest.raises(ReFreeKVError, match=r"scale: received 3 values; expected one number, or a list of 2"):
        refreekv.plan_layers([q, q], [K, K], scale=[1.0, 1.0, 1.0])
    bad = K.copy()
    bad[0, 0, 3, 0] = np.inf
    with pytest.raises(ReFreeKVError, match=r"keys\[1\]: received NaN or infinite values"):  # names the layer
        refreekv.plan_layers([q, q], [K, bad], ReFreeKVConfig.paper())
    with pytest.raises(ReFreeKVError, match=r"layers: received \[3\]; expected None or 2 layer indices"):
        refreekv.compress_layers([q, q], [K, K], [K, K], layers=[3])
    with pytest.raises(ReFreeKVError, match=r"values\[1\]: received None; expected a \(B, Hkv, n, d_v\) array"):
        refreekv.compress_layers([q, q], [K, K], [K, None])  # was an AttributeError inside the backend


def test_layers_planned_together_equal_layers_planned_alone():
    rng = np.random.default_rng(3)
    qs = [rng.normal(size=(2, 4, 1, 8)) for _ in range(3)]
    ks = [rng.normal(size=(2, 2, 40, 8)) * s for s in (0.5, 2.0, 4.0)]  # three different curves
    vs = [rng.normal(size=(2, 2, 40, 8)) for _ in range(3)]
    cfg = ReFreeKVConfig.paper(threshold=0.05, sinks=2)
    together = refreekv.compress_layers(qs, ks, vs, cfg, layers=[1, 4, 7], start=[0, 6])
    assert not together[0].report.compressed and together[0].report.reason == "retained layer"
    for i in (1, 2):
        alone = refreekv.compress_layer(qs[i], ks[i], vs[i], cfg, layer=4, start=[0, 6])
        assert together[i].report.kept == alone.report.kept
        np.testing.assert_array_equal(together[i].keys, alone.keys)
        np.testing.assert_array_equal(together[i].values, alone.values)
        np.testing.assert_array_equal(together[i].valid, alone.valid)
    assert len({tuple(t.report.kept) for t in together[1:]}) == 2  # the layers really got cuts of their own


def test_arrays_on_two_devices_are_refused_at_the_entry():
    """array_api_strict has several devices on one machine: a call mixing them is one ReFreeKVError
    naming the argument, not a framework error from inside a step."""
    import array_api_strict as xp
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from docs.examples.array_api_backend import ArrayAPIBackend

    rng = np.random.default_rng(0)
    q, K = rng.normal(size=(1, 4, 1, 8)), rng.normal(size=(1, 2, 12, 8))
    here, there = xp.Device("CPU_DEVICE"), xp.Device("device1")
    A = lambda a, d=here: xp.asarray(a, device=d)  # noqa: E731
    cfg = ReFreeKVConfig.paper()
    with Target(ArrayAPIBackend(), ("float64",)).active(valid_inputs=False):  # dispatch without registering
        _mixed_devices(A, q, K, there, cfg)


def _mixed_devices(A, q, K, there, cfg):
    with pytest.raises(ReFreeKVError, match=r"^q_rows: received an array on .*device1.*; expected the device of keys"):
        refreekv.plan_layer(A(q, there), A(K), cfg)
    with pytest.raises(ReFreeKVError, match=r"^values: received an array on .*device1"):
        refreekv.compress_layer(A(q), A(K), A(K, there), cfg)
    with pytest.raises(ReFreeKVError, match=r"^keys\[1\]: received an array on .*device1.*; expected the device of keys\[0\]"):
        refreekv.plan_layers([A(q), A(q)], [A(K), A(K, there)], cfg)
    plan = refreekv.plan_layer(A(q), A(K), cfg)
    with pytest.raises(ReFreeKVError, match=r"^values: received an array on .*device1"):
        refreekv.evict_plan(A(K), A(K, there), plan)
    with pytest.raises(ReFreeKVError, match=r"^plan: received an array on .*CPU_DEVICE.*; expected the device of keys"):
        refreekv.evict_plan(A(K, there), A(K, there), plan)
    k2, _ = refreekv.evict_plan(A(K), A(K), plan)  # one device: fine
    assert k2.shape[2] == int(plan.cut.max())


def test_a_meta_tensor_is_refused_at_the_entry():
    torch = pytest.importorskip("torch")
    q, K = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 12, 8)
    cfg = ReFreeKVConfig.paper()
    for args, argument in (((q.to("meta"), K), "q_rows"), ((q, K.to("meta")), "keys")):
        with pytest.raises(ReFreeKVError, match=rf"^{argument}: received a tensor on the meta device"):
            refreekv.plan_layer(*args, cfg)
    with pytest.raises(ReFreeKVError, match=r"^values: received a tensor on the meta device"):
        refreekv.compress_layer(q, K, K.to("meta"), cfg)


def test_nan_values_are_refused_and_large_finite_half_values_are_not():
    """The values never enter the decision, but the cache is handed back with them: NaN values are
    one error naming values (every layer named), and float16 values whose float16 sum would
    overflow are finite."""
    rng = np.random.default_rng(2)
    q, K = rng.normal(size=(1, 4, 1, 8)), rng.normal(size=(1, 2, 30, 8))
    V = rng.normal(size=(1, 2, 30, 8))
    bad = V.copy()
    bad[0, 1, 7, 3] = np.nan
    cfg = ReFreeKVConfig.paper()
    with pytest.raises(ReFreeKVError, match=r"^values: received NaN or infinite values"):
        refreekv.compress_layer(q, K, bad, cfg)
    with pytest.raises(ReFreeKVError, match=r"^values\[1\]: received NaN or infinite values"):
        refreekv.compress_layers([q, q], [K, K], [V, bad], cfg, layers=[4, 5])
    big = np.full((1, 2, 30, 8), 6e4, np.float16)
    out = refreekv.compress_layer(q.astype(np.float16), K.astype(np.float16), big, cfg)
    assert np.isfinite(out.values.astype(np.float32)).all()
