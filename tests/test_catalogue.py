"""A catalogue of bad inputs and valid edge cases, run on every installed backend.

Each bad input must raise one ``ReFreeKVError`` whose message starts with the argument at fault
(and says what came and what was expected); never a framework error, never a silently wrong
result. Each valid edge case must run. In both, the caller's arrays must come back unmodified.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import refreekv
from refreekv import ReFreeKVConfig, ReFreeKVError, builtin_backend

BACKENDS = ["numpy", "torch", "mlx"]
OTHER = {"numpy": "torch", "torch": "mlx", "mlx": "torch"}  # never NumPy: NumPy start offsets are valid everywhere
rng = np.random.default_rng(0)
Q, K, V = rng.normal(size=(1, 4, 1, 8)), rng.normal(size=(1, 2, 12, 8)), rng.normal(size=(1, 2, 12, 8))
ORDER = np.broadcast_to(np.arange(12), (1, 2, 12)).copy()  # a valid ranking of 12 positions (no padding)


class Arrays:
    """Arrays of the backend under test (``A``) and of another framework (``X``)."""

    def __init__(self, name: str):
        self.be, self.other = builtin_backend(name), builtin_backend(OTHER[name])
        self.made: list = []

    def A(self, x, dtype="float32"):
        out = self.be.from_numpy(np.asarray(x), dtype)
        self.made.append((out, np.array(self.be.to_numpy(out))))
        return out

    def X(self, x, dtype="float32"):
        return self.other.from_numpy(np.asarray(x), dtype)

    def untouched(self) -> bool:
        return all(np.array_equal(np.asarray(self.be.to_numpy(a)), b, equal_nan=True) for a, b in self.made)


def _with(x, at, value):
    y = np.array(x, dtype=np.float64)
    y[at] = value
    return y


PAPER = ReFreeKVConfig.paper()  # one query row: each call's error is about the argument at fault


def P(q, K, config=PAPER, **kw):
    return refreekv.plan_layer(q, K, config, **kw)


def C(q, K, V, config=PAPER, **kw):
    return refreekv.compress_layer(q, K, V, config, **kw)


def CL(qs, ks, vs, config=PAPER, **kw):
    return refreekv.compress_layers(qs, ks, vs, config, **kw)


def PL(qs, ks, config=PAPER, **kw):
    return refreekv.plan_layers(qs, ks, config, **kw)


BAD = [
    # (name, argument the message must start with, call taking an Arrays)
    ("NaN in keys", "keys", lambda a: P(a.A(Q), a.A(_with(K, (0, 1, 3, 2), np.nan)))),
    ("inf in q_rows", "q_rows", lambda a: P(a.A(_with(Q, (0, 0, 0, 0), np.inf)), a.A(K))),
    ("-inf in keys", "keys", lambda a: P(a.A(Q), a.A(_with(K, (0, 0, 0, 0), -np.inf)))),
    ("finite keys whose logits overflow float32", "keys", lambda a: P(a.A(Q * 1e20), a.A(K * 1e20))),
    ("integer keys", "keys", lambda a: P(a.A(Q), a.A(np.ones((1, 2, 12, 8)), "int32"))),
    ("boolean keys", "keys", lambda a: P(a.A(Q), a.A(np.ones((1, 2, 12, 8)), "bool"))),
    ("H not a multiple of Hkv", "q_rows", lambda a: P(a.A(Q[:, :3]), a.A(K))),
    ("head dims differ", "keys", lambda a: P(a.A(Q), a.A(K[..., :4]))),
    ("empty prompt", "keys", lambda a: P(a.A(Q), a.A(K[:, :, :0]))),
    ("zero query heads", "q_rows", lambda a: P(a.A(Q[:, :0]), a.A(K))),
    ("zero KV heads", "keys", lambda a: P(a.A(Q), a.A(K[:, :0]))),
    ("zero head dim", "q_rows", lambda a: P(a.A(Q[..., :0]), a.A(K[..., :0]))),
    ("empty batch", "q_rows", lambda a: P(a.A(Q[:0]), a.A(K[:0]))),
    ("keys of rank 3", "keys", lambda a: P(a.A(Q), a.A(K[0]))),
    ("q_rows of rank 5", "q_rows", lambda a: P(a.A(Q[None]), a.A(K))),
    ("batch of keys differs", "keys", lambda a: P(a.A(Q), a.A(np.concatenate([K, K])))),
    ("more query rows than tokens", "q_rows", lambda a: P(a.A(rng.normal(size=(1, 4, 13, 8))), a.A(K))),
    ("too few query rows for H2O", "q_rows", lambda a: P(a.A(Q), a.A(K), ReFreeKVConfig(ranking="h2o"))),
    ("too few query rows for k = 4", "q_rows", lambda a: P(a.A(Q), a.A(K), ReFreeKVConfig(query_rows=4))),
    ("values of another length", "values", lambda a: P(a.A(Q), a.A(K), values=a.A(V[:, :, :5]))),
    ("queries from another framework", "q_rows", lambda a: P(a.X(Q), a.A(K))),
    ("values from another framework", "values", lambda a: P(a.A(Q), a.A(K), values=a.X(V))),
    ("one layer's keys from another framework", "keys[1]",
     lambda a: PL([a.A(Q), a.A(Q)], [a.A(K), a.X(K)])),
    ("one layer's queries from another framework", "q_rows[1]",
     lambda a: PL([a.A(Q), a.X(Q)], [a.A(K), a.A(K)])),
    ("nested lists as queries", "q_rows", lambda a: P(Q.tolist(), a.A(K))),
    ("nested lists as keys", "keys", lambda a: P(a.A(Q), K.tolist())),
    ("a string as keys", "keys", lambda a: P(a.A(Q), "keys")),
    ("values None to compress_layer", "values", lambda a: C(a.A(Q), a.A(K), None)),
    ("values None to compress_layers", "values", lambda a: CL([a.A(Q)], [a.A(K)], None)),
    ("scale NaN", "scale", lambda a: P(a.A(Q), a.A(K), scale=float("nan"))),
    ("scale inf", "scale", lambda a: P(a.A(Q), a.A(K), scale=float("inf"))),
    ("scale a numeric string", "scale", lambda a: P(a.A(Q), a.A(K), scale="0.1")),
    ("scale a word", "scale", lambda a: P(a.A(Q), a.A(K), scale="large")),
    ("scale negative", "scale", lambda a: P(a.A(Q), a.A(K), scale=-0.1)),
    ("scale zero", "scale", lambda a: P(a.A(Q), a.A(K), scale=0.0)),
    ("scale True", "scale", lambda a: P(a.A(Q), a.A(K), scale=True)),
    ("one layer's scale NaN", "scale[1]",
     lambda a: PL([a.A(Q)] * 2, [a.A(K)] * 2, scale=[0.1, float("nan")])),
    ("a negative layer index", "layer", lambda a: C(a.A(Q), a.A(K), a.A(V), layer=-1)),
    ("a float layer index", "layer", lambda a: C(a.A(Q), a.A(K), a.A(V), layer=2.0)),
    ("layers of the wrong length", "layers",
     lambda a: CL([a.A(Q)] * 2, [a.A(K)] * 2, [a.A(V)] * 2, layers=[3])),
    ("a dict as config", "config", lambda a: P(a.A(Q), a.A(K), {"threshold": 0.1})),
    ("start past the prompt", "start", lambda a: P(a.A(Q), a.A(K), start=[12])),
    ("start negative", "start", lambda a: P(a.A(Q), a.A(K), start=[-1])),
    ("start of the wrong length", "start", lambda a: P(a.A(Q), a.A(K), start=[0, 0])),
    ("start as floats", "start", lambda a: P(a.A(Q), a.A(K), start=[0.5])),
    ("start from another framework", "start", lambda a: P(a.A(Q), a.A(K), start=a.X(np.zeros(1), "int64"))),
    ("keys not a list in plan_layers", "keys", lambda a: PL([a.A(Q)], a.A(K))),
    ("an empty list of layers", "keys", lambda a: PL([], [])),
    ("fewer query layers than key layers", "q_rows", lambda a: PL([a.A(Q)], [a.A(K)] * 2)),
    ("one layer's values of another shape", "values[1]",
     lambda a: CL([a.A(Q)] * 2, [a.A(K)] * 2, [a.A(V), a.A(V[:, :, :3])])),
    ("layers of different lengths", "keys[1]", lambda a: PL([a.A(Q)] * 2, [a.A(K), a.A(K[:, :, 1:])])),
    ("a cut past the prompt", "cut", lambda a: refreekv.kept_positions(a.A(ORDER, "int64"), [13])),
    ("a cut of zero", "cut", lambda a: refreekv.kept_positions(a.A(ORDER, "int64"), [0])),
    ("an order that is no ranking", "order", lambda a: refreekv.kept_positions(a.A(np.zeros((1, 2, 12)), "int64"), [3])),
    ("an order without the sinks first", "order",
     lambda a: refreekv.norm_ratio_curve(a.A(np.ones((1, 4, 12))), a.A(ORDER[:, :, ::-1].copy(), "int64"), sinks=1)),
    ("negative scores", "a", lambda a: refreekv.norm_ratio_curve(a.A(-np.ones((1, 4, 12))), a.A(ORDER, "int64"), sinks=1)),
    ("a NaN in the ratio", "ratio",
     lambda a: refreekv.threshold_cut(a.A(np.full((1, 12), np.nan)), threshold=0.01, sinks=1)),
    ("a ratio above 1", "ratio", lambda a: refreekv.threshold_cut(a.A(np.full((1, 12), 2.0)), threshold=0.01, sinks=1)),
    ("positions past the prompt", "idx", lambda a: refreekv.evict(a.A(K), a.A(V), a.A(np.full((1, 2, 3), 12), "int64"))),
    ("positions of the wrong rank", "idx", lambda a: refreekv.evict(a.A(K), a.A(V), a.A(np.zeros((1, 3)), "int64"))),
    ("float positions", "idx", lambda a: refreekv.evict(a.A(K), a.A(V), a.A(np.zeros((1, 2, 3))))),
    ("an order of the wrong shape", "order",
     lambda a: refreekv.norm_ratio_curve(a.A(np.ones((1, 4, 12))), a.A(np.zeros((1, 3, 12)), "int64"), sinks=1)),
    ("a threshold of 1.5", "threshold", lambda a: refreekv.threshold_cut(a.A(np.zeros((1, 12))), threshold=1.5, sinks=1)),
    ("combine 'median'", "combine", lambda a: refreekv.attention_row(a.A(Q), a.A(K), combine="median")),
    ("norm 'l3'", "norm", lambda a: refreekv.norm_ratio_curve(a.A(np.ones((1, 4, 12))),
                                                              a.A(ORDER, "int64"), sinks=1, norm="l3")),
    ("rows past the given rows", "rows", lambda a: refreekv.attention_row(a.A(Q), a.A(K), rows=[2])),
    ("query_rows as a string", "query_rows", lambda a: ReFreeKVConfig(query_rows="8")),
    ("sinks as a float", "sinks", lambda a: ReFreeKVConfig(sinks=np.float64(2.0))),
    ("threshold as a string", "threshold", lambda a: ReFreeKVConfig(threshold="0.01")),
    ("replan 'always'", "replan", lambda a: ReFreeKVConfig(replan="always")),
    ("plans reused under another ranking", "reuse",
     lambda a: CL([a.A(Q)], [a.A(K)], [a.A(V)], ReFreeKVConfig.paper(window=2), reuse=PL([a.A(Q)], [a.A(K)]))),
    ("a plan whose cut was edited past the prompt", "plan", lambda a: refreekv.evict_plan(
        a.A(K), a.A(V), dataclasses.replace(P(a.A(Q), a.A(K)), cut=np.array([13])))),
    ("a plan whose cut was edited to an int", "plan", lambda a: refreekv.evict_plan(
        a.A(K), a.A(V), dataclasses.replace(P(a.A(Q), a.A(K)), cut=5))),
    ("a plan whose cut was edited without its idx", "plan", lambda a: refreekv.evict_plan(
        a.A(K), a.A(V), dataclasses.replace(P(a.A(Q), a.A(K)), cut=np.array([5])))),
    ("a reused plan whose padding was edited", "reuse", lambda a: CL(
        [a.A(Q)], [a.A(K)], [a.A(V)], reuse=[dataclasses.replace(P(a.A(Q), a.A(K)), start=np.array([3]))])),
    ("a plan for other keys", "keys", lambda a: refreekv.evict_plan(a.A(K[:, :, :6]), a.A(V[:, :, :6]),
                                                                   P(a.A(Q), a.A(K)))),
    ("quantize at 3 bits", "bits", lambda a: refreekv.quantize(a.A(K), bits=3)),
    ("quantize at True bits", "bits", lambda a: refreekv.quantize(a.A(K), bits=True)),
    ("quantize NaN values", "x", lambda a: refreekv.quantize(a.A(_with(K, (0, 1, 3, 2), np.nan)), bits=8)),
    ("quantize integers", "x", lambda a: refreekv.quantize(a.A(np.ones((2, 8)), "int32"), bits=8)),
    ("quantize an empty head dimension", "x", lambda a: refreekv.quantize(a.A(K[..., :0]), bits=8)),
    ("quantize with a group that does not divide d", "group", lambda a: refreekv.quantize(a.A(K), bits=8, group=3)),
    ("quantize an odd d at 4 bits", "x", lambda a: refreekv.quantize(a.A(K[..., :5]), bits=4)),
    ("dequantize a tuple", "q", lambda a: refreekv.dequantize((a.A(K), a.A(K), a.A(K), 8, 8, "float32"))),
    ("dequantize an edited group", "q", lambda a: refreekv.dequantize(
        refreekv.quantize(a.A(K), bits=8)._replace(group=4))),
    ("dequantize edited bits", "q", lambda a: refreekv.dequantize(refreekv.quantize(a.A(K), bits=8)._replace(bits=4))),
    ("dequantize scales from another framework", "q.scales", lambda a: refreekv.dequantize(
        refreekv.quantize(a.A(K), bits=8)._replace(scales=a.X(np.ones((1, 2, 12, 1)))))),
    ("tail positions past the prompt", "cut", lambda a: refreekv.tail_positions(a.A(ORDER, "int64"), [13])),
    ("tail positions with a cut past a padded prompt", "cut",
     lambda a: refreekv.tail_positions(a.A(ORDER[:, :, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], "int64"), [11], start=[2])),
    ("quantize_tail of a dict", "plan", lambda a: refreekv.quantize_tail(a.A(K), a.A(V), {"cut": 3}, bits=8)),
    ("quantize_tail at 2 bits", "bits", lambda a: refreekv.quantize_tail(a.A(K), a.A(V), P(a.A(Q), a.A(K)), bits=2)),
    ("quantize_tail of other keys", "keys", lambda a: refreekv.quantize_tail(
        a.A(K[:, :, :6]), a.A(V[:, :, :6]), P(a.A(Q), a.A(K)), bits=8)),
    ("quantize_tail of NaN values", "values", lambda a: refreekv.quantize_tail(
        a.A(K), a.A(_with(V, (0, 0, 5, 1), np.nan)), P(a.A(Q), a.A(K)), bits=8)),
    ("quantize_tail values from another framework", "values", lambda a: refreekv.quantize_tail(
        a.A(K), a.X(V), P(a.A(Q), a.A(K)), bits=8)),
    ("one layer index twice", "layers", lambda a: CL([a.A(Q)] * 2, [a.A(K)] * 2, [a.A(V)] * 2, layers=[3, 3])),
    ("rows for a prompt of no tokens", "n", lambda a: ReFreeKVConfig().rows_needed(0)),
    ("rows for a prompt length that is a string", "n", lambda a: ReFreeKVConfig().rows_for("12")),
    ("is_retained of a negative layer", "layer", lambda a: ReFreeKVConfig().is_retained(-1)),
    ("an unknown built-in backend", "name", lambda a: builtin_backend("jax")),
    ("a backend module that does not import", "backend", lambda a: refreekv.backend.load_backend("no_such_mod:B")),
    ("a backend path naming a module", "backend", lambda a: refreekv.backend.load_backend("os:path")),
    ("a backend path naming another class", "backend", lambda a: refreekv.backend.load_backend("collections:Counter")),
    ("a backend path with a missing attribute", "backend", lambda a: refreekv.backend.load_backend("os:NoSuchThing")),
]


def _valid(fn):
    return fn


R = np.random.default_rng(1)
VALID = [
    ("a one-token prompt", lambda a: P(a.A(Q), a.A(K[:, :, :1]))),
    ("a prompt of sinks + 1 tokens", lambda a: C(a.A(Q), a.A(K[:, :, :5]), a.A(V[:, :, :5]))),
    ("a prompt of sinks + 2 tokens", lambda a: C(a.A(Q), a.A(K[:, :, :6]), a.A(V[:, :, :6]))),
    ("no sinks", lambda a: P(a.A(Q), a.A(K), ReFreeKVConfig.paper(sinks=0))),
    ("GQA groups of 1", lambda a: P(a.A(Q[:, :2]), a.A(K))),
    ("one KV head for every query head", lambda a: P(a.A(Q), a.A(K[:, :1]))),
    ("threshold 0", lambda a: P(a.A(Q), a.A(K), ReFreeKVConfig.paper(threshold=0))),
    ("threshold 0.999", lambda a: P(a.A(Q), a.A(K), ReFreeKVConfig.paper(threshold=0.999))),
    ("the default configuration with its 32 query rows", lambda a: P(a.A(rng.normal(size=(1, 4, 12, 8))), a.A(K),
                                                                    ReFreeKVConfig())),
    ("NumPy scalars in the config", lambda a: P(a.A(rng.normal(size=(1, 4, 2, 8))), a.A(K), ReFreeKVConfig(
        sinks=np.int64(2), threshold=np.float32(0.05), query_rows=np.int32(2), window=np.int16(3),
        retained_layers=np.arange(2), pool_kernel=np.int64(3)))),
    ("start as a NumPy int32 array", lambda a: P(a.A(np.concatenate([Q, Q])), a.A(np.concatenate([K, K])),
                                                start=np.array([0, 3], np.int32))),
    ("start as a tuple", lambda a: P(a.A(Q), a.A(K), start=(2,))),
    ("start as the backend's own array", lambda a: P(a.A(Q), a.A(K), start=a.A(np.array([2]), "int64"))),
    ("scale as a NumPy float32", lambda a: P(a.A(Q), a.A(K), scale=np.float32(0.2))),
    ("queries as (B, H, d)", lambda a: P(a.A(Q[:, :, 0]), a.A(K))),
    ("float16 inputs", lambda a: P(a.A(Q, "float16"), a.A(K, "float16"))),
    ("a padded sample with one real token", lambda a: P(a.A(np.concatenate([Q, Q])), a.A(np.concatenate([K, K])),
                                                       start=[0, 11])),
    ("all-zero keys (flat attention)", lambda a: P(a.A(Q), a.A(np.zeros_like(K)))),
    ("logits near 1e4 (need max subtraction)", lambda a: P(a.A(Q * 300), a.A(K * 300))),
    ("keys near 1e-30", lambda a: P(a.A(Q), a.A(K * 1e-30))),
    ("a retained layer through compress_layers", lambda a: CL(
        [a.A(Q)] * 2, [a.A(K)] * 2, [a.A(V)] * 2, layers=[np.int64(0), np.int64(5)])),
    ("every ranking", lambda a: [P(a.A(rng.normal(size=(1, 4, 12, 8))), a.A(K), ReFreeKVConfig(ranking=r))
                                 for r in refreekv.RANKINGS]),
    ("quantize a constant array (scale 0)", lambda a: refreekv.dequantize(refreekv.quantize(a.A(np.ones((2, 64))), bits=4))),
    ("quantize float16 at 4 bits", lambda a: refreekv.dequantize(refreekv.quantize(a.A(K, "float16"), bits=4))),
    ("a tail of a plan that keeps everything", lambda a: refreekv.quantize_tail(
        a.A(K), a.A(V), P(a.A(Q), a.A(K), ReFreeKVConfig.paper(threshold=0)), bits=8)),
    ("a tail of a padded batch", lambda a: refreekv.quantize_tail(
        a.A(np.concatenate([K, K])), a.A(np.concatenate([V, V])),
        P(a.A(np.concatenate([Q, Q])), a.A(np.concatenate([K, K])), start=[0, 7]), bits=4)),
    ("plans reused for a fixed-budget sweep", lambda a: CL(
        [a.A(Q)], [a.A(K)], [a.A(V)], ReFreeKVConfig.paper(halting="ratio", budget=0.5),
        reuse=PL([a.A(Q)], [a.A(K)]))),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,argument,call", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_clearly(backend, name, argument, call):
    a = Arrays(backend)
    with pytest.raises(ReFreeKVError) as info:
        call(a)
    msg = str(info.value)
    assert msg.startswith(argument + ": received "), msg
    assert "; expected " in msg
    assert a.untouched()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,call", VALID, ids=[v[0] for v in VALID])
def test_valid_edge_case_runs(backend, name, call):
    a = Arrays(backend)
    call(a)
    assert a.untouched()


def test_the_catalogue_is_large_enough():
    assert len(BAD) >= 40 and len(VALID) >= 15


def test_numpy_scalars_are_stored_as_python_numbers():
    cfg = ReFreeKVConfig(sinks=np.int64(2), threshold=np.float32(0.25), query_rows=np.int32(3))
    assert type(cfg.sinks) is int and type(cfg.threshold) is float and type(cfg.query_rows) is int
    assert dataclasses.asdict(cfg)["threshold"] == 0.25
