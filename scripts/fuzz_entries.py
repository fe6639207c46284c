"""Bad and odd inputs into the core entries, on NumPy, torch and MLX: report any exception that is not a
ReFreeKVError, and any successful plan_layer whose cut differs from the reference's.

    python scripts/fuzz_entries.py        # 4 s on 2 CPU cores

Each of the mutations below (wrong dtypes, shapes, NaN/inf, empty axes, bad start / scale / layer /
keep_newest, batches with padding, ...) is applied to a valid (q_rows, keys, values) and run through
compress_layer, plan_layer and compress_layers with 11 configurations. Prints the number of calls, the
successes compared with the reference, and one line per kind of escape (none expected).
"""
import itertools
import random
import traceback

import mlx.core as mx
import numpy as np
import torch

import refreekv
import refreekv.reference as ref
from refreekv import ReFreeKVError, ReFreeKVConfig

rng = np.random.default_rng(0)
random.seed(0)

def conv(a, fw):
    if a is None or not isinstance(a, np.ndarray): return a
    if fw == "numpy": return a
    if fw == "torch":
        try: return torch.from_numpy(a.copy())
        except Exception: return a
    if fw == "mlx":
        try: return mx.array(a)
        except Exception: return a

def good(B=1, H=4, Hkv=2, k=32, n=40, d=8, dtype=np.float32):
    q = rng.normal(size=(B, H, k, d)).astype(dtype)
    K = rng.normal(size=(B, Hkv, n, d)).astype(dtype)
    V = rng.normal(size=(B, Hkv, n, d)).astype(dtype)
    return q, K, V

mutations = []
def mut(f): mutations.append(f); return f

@mut
def wrong_dtype_int(q, K, V, kw): return q.astype(np.int32), K, V, kw
@mut
def bool_keys(q, K, V, kw): return q, K > 0, V, kw
@mut
def float64(q, K, V, kw): return q.astype(np.float64), K.astype(np.float64), V.astype(np.float64), kw
@mut
def float16(q, K, V, kw): return q.astype(np.float16), K.astype(np.float16), V.astype(np.float16), kw
@mut
def mixed_dtype(q, K, V, kw): return q.astype(np.float16), K, V, kw
@mut
def d_mismatch(q, K, V, kw): return q[..., :-1], K, V, kw
@mut
def heads_not_div(q, K, V, kw): return q[:, :3], K, V, kw
@mut
def fewer_q_heads(q, K, V, kw): return q[:, :1], K, V, kw
@mut
def batch_mismatch(q, K, V, kw): return np.concatenate([q, q]), K, V, kw
@mut
def values_n_mismatch(q, K, V, kw): return q, K, V[:, :, :-1], kw
@mut
def values_heads_mismatch(q, K, V, kw): return q, K, V[:, :1], kw
@mut
def values_dv(q, K, V, kw): return q, K, np.concatenate([V, V], -1), kw
@mut
def empty_n(q, K, V, kw): return q, K[:, :, :0], V[:, :, :0], kw
@mut
def n_one(q, K, V, kw): return q, K[:, :, :1], V[:, :, :1], kw
@mut
def zero_heads(q, K, V, kw): return q[:, :0], K[:, :0], V[:, :0], kw
@mut
def zero_d(q, K, V, kw): return q[..., :0], K[..., :0], V[..., :0], kw
@mut
def q3d(q, K, V, kw): return q[:, :, -1], K, V, kw
@mut
def q5d(q, K, V, kw): return q[None], K, V, kw
@mut
def k3d(q, K, V, kw): return q, K[0], V[0], kw
@mut
def nan_q(q, K, V, kw): q = q.copy(); q[0, 0, -1, 0] = np.nan; return q, K, V, kw
@mut
def inf_k(q, K, V, kw): K = K.copy(); K[0, 0, 5, 0] = np.inf; return q, K, V, kw
@mut
def nan_v(q, K, V, kw): V = V.copy(); V[0, 0, 5, 0] = np.nan; return q, K, V, kw
@mut
def huge(q, K, V, kw): return q * 1e20, K * 1e20, V, kw
@mut
def few_rows(q, K, V, kw): return q[:, :, -3:], K, V, kw
@mut
def more_rows_than_n(q, K, V, kw): return q, K[:, :, :10], V[:, :, :10], kw
@mut
def start_neg(q, K, V, kw): return q, K, V, {**kw, "start": -1}
@mut
def start_big(q, K, V, kw): return q, K, V, {**kw, "start": 10**6}
@mut
def start_float(q, K, V, kw): return q, K, V, {**kw, "start": 1.5}
@mut
def start_list_len(q, K, V, kw): return q, K, V, {**kw, "start": [0, 0, 0]}
@mut
def start_ok(q, K, V, kw): return q, K, V, {**kw, "start": 3}
@mut
def start_at_n(q, K, V, kw): return q, K, V, {**kw, "start": K.shape[2]}
@mut
def start_arr_float(q, K, V, kw): return q, K, V, {**kw, "start": np.array([1.0])}
@mut
def start_bool(q, K, V, kw): return q, K, V, {**kw, "start": True}
@mut
def scale_zero(q, K, V, kw): return q, K, V, {**kw, "scale": 0.0}
@mut
def scale_neg(q, K, V, kw): return q, K, V, {**kw, "scale": -1.0}
@mut
def scale_nan(q, K, V, kw): return q, K, V, {**kw, "scale": float("nan")}
@mut
def scale_str(q, K, V, kw): return q, K, V, {**kw, "scale": "0.1"}
@mut
def scale_arr(q, K, V, kw): return q, K, V, {**kw, "scale": np.float32(0.2)}
@mut
def layer_neg(q, K, V, kw): return q, K, V, {**kw, "layer": -1}
@mut
def layer_float(q, K, V, kw): return q, K, V, {**kw, "layer": 2.0}
@mut
def layer_bool(q, K, V, kw): return q, K, V, {**kw, "layer": True}
@mut
def layer_ret(q, K, V, kw): return q, K, V, {**kw, "layer": 1}
@mut
def keep_newest_neg(q, K, V, kw): return q, K, V, {**kw, "keep_newest": -1}
@mut
def keep_newest_big(q, K, V, kw): return q, K, V, {**kw, "keep_newest": 10**6}
@mut
def keep_newest_float(q, K, V, kw): return q, K, V, {**kw, "keep_newest": 2.5}
@mut
def keep_newest_ok(q, K, V, kw): return q, K, V, {**kw, "keep_newest": 5}
@mut
def noncontig(q, K, V, kw): return q[..., ::-1], K[..., ::-1], V[..., ::-1], kw
@mut
def values_none(q, K, V, kw): return q, K, None, kw
@mut
def list_input(q, K, V, kw): return q.tolist(), K, V, kw
@mut
def config_dict(q, K, V, kw): return q, K, V, {**kw, "config": {"threshold": 0.01}}
@mut
def batch2_start(q, K, V, kw): return np.concatenate([q, q]), np.concatenate([K, K]), np.concatenate([V, V]), {**kw, "start": [0, 7]}
@mut
def batch2_start_short(q, K, V, kw): return np.concatenate([q, q]), np.concatenate([K, K]), np.concatenate([V, V]), {**kw, "start": [0, 36]}
@mut
def complex_(q, K, V, kw): return q.astype(np.complex64), K, V, kw

configs = [ReFreeKVConfig(), ReFreeKVConfig.paper(), ReFreeKVConfig(ranking="snapkv"), ReFreeKVConfig(ranking="pooled"),
           ReFreeKVConfig(halting="ratio", budget=0.5), ReFreeKVConfig(halting="count", budget=3),
           ReFreeKVConfig(heads="max", combine="max", norm="l1", norm_scope="all"), ReFreeKVConfig(mass_threshold=0.05),
           ReFreeKVConfig(query_rows=0.5), ReFreeKVConfig(sinks=0), ReFreeKVConfig(threshold=0)]

def run() -> tuple[int, int, dict]:
    """(calls made, plans compared with the reference, {kind of escape: an example})."""
    problems = {}
    count = compared = 0
    for fw, m, cfg in itertools.product(["numpy", "torch", "mlx"], mutations, configs):
        q, K, V = good()
        kw = {"layer": 5}
        q, K, V, kw = m(q, K, V, kw)
        cfgx = kw.pop("config", cfg)
        for entry in ("compress_layer", "plan_layer", "compress_layers"):
            args = [conv(q, fw) if not isinstance(q, list) else q, conv(K, fw), conv(V, fw)]
            kw2 = dict(kw)
            for key in ("start",):
                if isinstance(kw2.get(key), np.ndarray): kw2[key] = conv(kw2[key], fw)
            try:
                count += 1
                if entry == "compress_layer":
                    out = refreekv.compress_layer(*args, cfgx, **kw2)
                elif entry == "plan_layer":
                    kw2.pop("layer", None)
                    out = refreekv.plan_layer(args[0], args[1], cfgx, values=args[2], **kw2)
                    # silent-wrong check: the reference on the same inputs in float64
                    try:
                        r = ref.plan_layer(np.asarray(q, np.float64), np.asarray(K, np.float64), cfgx,
                                           start=kw2.get("start") if not isinstance(kw2.get("start"), (mx.array, torch.Tensor)) else np.asarray(kw.get("start")),
                                           scale=kw2.get("scale"), keep_newest=None if kw2.get("keep_newest") is None else np.full(np.asarray(q).shape[0], kw2["keep_newest"]))
                        compared += 1
                        got = np.asarray(out.cut) if not hasattr(out.cut, "numpy") else out.cut.numpy()
                        if not np.array_equal(np.asarray(got).reshape(-1), np.asarray(r["cut"]).reshape(-1)):
                            d = np.abs(np.asarray(got).reshape(-1).astype(int) - np.asarray(r["cut"]).reshape(-1).astype(int)).max()
                            key = ("CUT DIFFERS", m.__name__, str(cfgx.ranking)+cfgx.halting, fw)
                            problems.setdefault(key, (d, got, r["cut"]))
                    except ReFreeKVError:
                        pass
                    except Exception as e:
                        problems.setdefault(("ref raised", m.__name__), repr(e)[:200])
                else:
                    l = kw2.pop("layer", None)
                    out = refreekv.compress_layers([args[0]]*2, [args[1]]*2, [args[2]]*2, cfgx, layers=None if l is None else [l, l+1] if isinstance(l, int) and not isinstance(l, bool) and l >= 0 else [l, 3], **kw2)
            except ReFreeKVError as e:
                msg = str(e)
                if len(msg) < 20: problems.setdefault(("short msg", m.__name__, entry), (fw, msg))
                continue
            except Exception as e:
                key = (type(e).__name__, m.__name__, entry)
                if key not in problems:
                    problems[key] = (fw, cfgx, "".join(traceback.format_exception_only(e))[:300])
    return count, compared, problems


def main() -> None:
    count, compared, problems = run()
    print("calls", count)
    print("compared with the reference", compared)
    for k, v in problems.items():
        print("ESCAPE", k, v)


if __name__ == "__main__":
    main()
