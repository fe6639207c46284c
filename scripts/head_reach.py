"""How far back each layer's score row reaches, head by head, against the rule's cut and the answer's rows.

    python scripts/head_reach.py [demo|dev|test|holdout]

The study round four of issue 10 started from (docs/results.md, "Round four"), on the round-three default
(``heads="mean"``, T = 0.05 %). Per prompt (the demo's, or a split's open questions) and layer, from one eager
forward over prompt + the full cache's greedy answer (24 tokens): ``kept``, the share of the prompt the rule
keeps; ``rule_row``, the share one head of the plain mean of the newest 32 prompt rows needs for its L2 norm
within T (newest first, sinks aside), averaged over heads; ``last32``, the same per row; ``answer`` and
``answer_row``, the answer's rows (each, and their mean); ``exp32`` / ``expall``, an expected-attention row
(kvpress ExpectedAttention's idea: softmax of ``s mu.k + s^2 k^T C k / 2`` for queries ~ N(mu, C)) from the
newest 32 post-RoPE query rows, or from every prompt row's pre-RoPE query placed at the last position;
``_mu``: the mean term only; ``kept_now``: the share the current default (round four's
``heads="each"``, T = 0.125 %) keeps. Prints the layers the rule keeps at under 50 % and the means; writes
head_reach_SPLIT.json in the working folder.
"""
import sys, time, json
import numpy as np
import torch

from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from answer_reach import eager_forward, needed  # noqa: E402
from refreekv import ReFreeKVConfig
from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill, _queries
from refreekv.commands.models import load_torch
from refreekv.commands.runner import _fork, greedy

torch.set_grad_enabled(False)
split = sys.argv[1] if len(sys.argv) > 1 else "demo"
model, tok = load_torch()
if split == "demo":
    from refreekv.commands.demo import demo_prompts
    prompts = [(name, text) for name, text, _ in demo_prompts(tok)]
else:
    from refreekv.commands.tasks import build
    prompts = [(q.id, q.text) for q in build(tok, split) if q.kind == "open"]
cfg = ReFreeKVConfig.evicting(heads="mean", threshold=0.0005)  # the round-three default this study was made on
T, S = cfg.threshold, cfg.sinks
rows_out = []
t0 = time.time()


def rope_at(module, x, cos, sin):
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")
    return rope(x, x, cos, sin)[0]


for name, text in prompts:
    ids = tok([text], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    if n < 200:
        continue
    pre = capture_prefill(model, ids, configs=[cfg, ReFreeKVConfig.evicting()])
    answer = greedy(model, tok, _fork(pre.cache), pre.logits, n, 24).tokens
    kept = {r.layer: r.kept[0] / r.prompt_lengths[0] for r in ReFreeKVCache.from_prefill(pre, cfg).report.layers}
    kept_now = {r.layer: r.kept[0] / r.prompt_lengths[0] for r in ReFreeKVCache.from_prefill(pre).report.layers}
    out = {}

    def hook(layer):
        def reduce(module, args, kwargs, output):
            w = output[1][0]  # (H, q, k)
            hidden = kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            H, d = w.shape[0], module.head_dim
            B, L, _ = hidden.shape
            k = module.k_proj(hidden).view(B, L, -1, d).transpose(1, 2)
            k = rope_at(module, k, cos, sin)[0, :, :n].double()  # (Hkv, n, d)
            k = k.repeat_interleave(H // k.shape[0], 0)
            s = module.scaling
            q = _queries(module, hidden[:, :n], cos[:, :n], sin[:, :n])[0].double()  # (H, n, d) post-RoPE
            # pre-RoPE queries of every prompt row, placed at the last prompt position
            qp = module.q_proj(hidden[:, :n]).view(B, n, -1, d).transpose(1, 2)
            qlast = rope_at(module, qp, cos[:, n - 1:n].expand(-1, n, -1), sin[:, n - 1:n].expand(-1, n, -1))[0].double()
            res = {}
            for label, Q in (("exp32", q[:, n - 32:]), ("expall", qlast[:, S:])):
                mu = Q.mean(1)  # (H, d)
                C = torch.einsum("hrd,hre->hde", Q - mu[:, None], Q - mu[:, None]) / (Q.shape[1] - 1)
                lg = s * torch.einsum("hd,hnd->hn", mu, k) + 0.5 * s * s * torch.einsum("hnd,hde,hne->hn", k, C, k)
                a = torch.softmax(lg, -1)[:, None]  # (H, 1, n)
                res[label] = float(needed(a, n, S, T).mean())
                # and the same with the mean term only (no variance)
                a0 = torch.softmax(s * torch.einsum("hd,hnd->hn", mu, k), -1)[:, None]
                res[label + "_mu"] = float(needed(a0, n, S, T).mean())
            # the rule's own mean score row (plain mean over the 32 rows, causal)
            arow = w[:, n - 32:n, :n].double().mean(1, keepdim=True)
            res["rule_row"] = float(needed(arow, n, S, T).mean())
            res["last32"] = float(needed(w[:, n - 32:n], n, S, T).mean())
            res["answer"] = float(needed(w[:, n:], n, S, T).mean())
            res["answer_row"] = float(needed(w[:, n:, :n].double().mean(1, keepdim=True), n, S, T).mean())
            out[layer] = res
            return (output[0], None)
        return reduce

    eager_forward(model, torch.cat([ids, torch.tensor([answer])], 1), hook)
    for layer in sorted(out):
        rows_out.append({"prompt": name, "n": n, "layer": layer, "kept": kept.get(layer, 1.0),
                         "kept_now": kept_now.get(layer, 1.0), **out[layer]})
    print(name, n, f"{time.time() - t0:.0f}s", flush=True)

json.dump(rows_out, open(f"head_reach_{split}.json", "w"))
keys = ["kept", "kept_now", "rule_row", "last32", "answer", "answer_row", "exp32", "exp32_mu", "expall", "expall_mu"]
print("prompt layer " + " ".join(keys))
for r in rows_out:
    if r["kept"] < 0.5:
        print(r["prompt"][:20], r["layer"], " ".join(f"{r[k]:.2f}" for k in keys))
for prompt in dict.fromkeys(r["prompt"] for r in rows_out):
    print(prompt[:28], "kept per layer (round three / now):",
          " ".join(f"{r['kept']:.0%}/{r['kept_now']:.0%}" for r in rows_out if r["prompt"] == prompt))
import statistics  # noqa: E402
loc = [r for r in rows_out if r["kept"] < 0.5]
print("mean over local layers:", {k: round(statistics.mean(r[k] for r in loc), 3) for k in keys})
print("mean over all layers:", {k: round(statistics.mean(r[k] for r in rows_out), 3) for k in keys})
for k in keys[2:]:
    print(k, "corr with answer_row:", round(float(np.corrcoef([r[k] for r in rows_out], [r["answer_row"] for r in rows_out])[0, 1]), 3))
