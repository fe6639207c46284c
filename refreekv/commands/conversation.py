"""`refreekv eval --task conversation` and `--task generation`: compression that follows the cache.

conversation: 10-turn chats built from the split's texts. Turns 1-5 each bring ~250 tokens of
essay with one planted fact ("The code for the <name> archive is <number>."); turns 6-10 each ask
for one of those facts. Each method runs its own chat (its own answers become the history) with
one cache through the whole conversation: the full cache, ReFreeKV compressing once after the
first prompt (``replan="once"``), ReFreeKV re-planning after every turn (``replan="turns"``), and
re-planning after every turn with the turn being answered kept whole (``replan="history"``), and the first
prompt compressed with every later turn kept whole (``replan="chat"``).
Per turn: KV bytes held, the answer, whether it holds the fact, time spent planning.

generation: one prompt, the full cache's greedy continuation of ``--gen-tokens`` tokens, then
every method teacher-forced on those tokens one at a time (so re-planning during generation runs
as it would): KL(full || method) and top-1 agreement over the generated tokens, and the bytes held
every 64 tokens. Methods: full, compress once, and re-planning every N generated tokens.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from refreekv import ReFreeKVConfig

from .models import load_torch
from .output import markdown_table, rich_table, write
from .tasks import SPLITS, filler

NAMES = ("north", "river", "cedar", "copper", "meadow", "harbor", "summit", "violet", "granite", "ember")


def conversations(tok, split: str, count: int) -> list[list[tuple[str, str]]]:
    """``count`` chats of 10 (user turn, expected fact or "") pairs."""
    sp = SPLITS[split]
    rng = random.Random(sp.seed + 101)
    out = []
    offset = 50_000
    for _ in range(count):
        names = rng.sample(NAMES, 5)
        codes = [str(rng.randint(1000, 9999)) for _ in names]
        turns = []
        for name, code in zip(names, codes):
            text = filler(tok, split, 250, offset)
            offset += 1777
            at = text.find(". ", len(text) // 2)
            text = text[:at + 2] + f"The code for the {name} archive is {code}. " + text[at + 2:]
            turns.append((f"Please read this passage and reply with one short sentence.\n\n{text}", ""))
        order = rng.sample(range(5), 5)
        for i in order:
            turns.append((f"What is the code for the {names[i]} archive? Answer with the number only.", codes[i]))
        out.append(turns)
    return out


def _held(cache) -> int:
    from refreekv.adapters.transformers import cache_bytes

    return cache_bytes(cache)


@torch.no_grad()
def chat(model, tok, cache, turns, max_new_tokens: int = 24) -> list[dict]:
    from refreekv.adapters.transformers import ReFreeKVCache, refreekv_hooks

    msgs, rows = [], []
    for i, (text, expect) in enumerate(turns):
        msgs.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        plans = len(cache.history.plans) if isinstance(cache, ReFreeKVCache) else 0
        t = time.perf_counter()
        with refreekv_hooks(model):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                                 max_new_tokens=max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - t
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        msgs.append({"role": "assistant", "content": answer})
        new_plans = len(cache.history.plans) - plans if isinstance(cache, ReFreeKVCache) else 0
        plan_s = cache.report.seconds if new_plans else 0.0
        rows.append({"turn": i + 1, "tokens": int(out.shape[1]), "kv_bytes": _held(cache), "answer": answer,
                     "expect": expect, "ok": (expect in answer) if expect else None, "seconds": seconds,
                     "plans": new_plans, "plan_ms": 1e3 * plan_s if new_plans else 0.0})
    return rows


def run_conversation(split: str, out_dir: str, count: int = 3, as_json: bool = False,
                     default: ReFreeKVConfig | None = None) -> dict:
    from rich.console import Console
    from transformers import DynamicCache

    from refreekv.adapters.transformers import ReFreeKVCache

    console = Console(stderr=as_json)
    model, tok = load_torch()
    base = ReFreeKVConfig() if default is None else default
    methods = {"full": None, "compress once": _with(base, replan="once"), "re-plan each turn": _with(base, replan="turns"),
               "re-plan, turn kept whole": _with(base, replan="history"),
               "re-plan, later turns kept whole": _with(base, replan="chat")}
    results = {name: [] for name in methods}
    for c, turns in enumerate(conversations(tok, split, count)):
        for name, cfg in methods.items():
            console.print(f"conversation {c + 1}/{count}: {name}")
            cache = DynamicCache(config=model.config) if cfg is None else ReFreeKVCache(model, cfg)
            results[name].append(chat(model, tok, cache, turns))
    summary = summarize(results)
    rows = _rows(summary)
    md = conversation_markdown(split, base, results, summary)
    out = {"split": split, "config": base.to_dict(), "summary": summary, "runs": results}
    write(out_dir, f"eval_conversation_{split}", out, md)
    _plot_bytes({n: s["kv_mb_by_turn"] for n, s in summary.items()}, f"{out_dir}/eval_conversation_{split}.png",
                "turn", "KV cache held (MB, mean over conversations)")
    if not as_json:
        console.print(rich_table("conversation", ["method", "recalled", "only it / only full", "= full (q)",
                                                  "= full (all)", "MB t1", "MB t5", "MB t10", "ms/plan"], rows))
    return out


def _sign_test(a: int, b: int) -> float:
    """Two-sided exact sign test: the chance of a split at least as uneven as a : b of a + b
    discordant questions if either side were equally likely to be the one that is right."""
    n = a + b
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(a, b) + 1)) / 2**n) if n else 1.0


def summarize(results: dict[str, list[list[dict]]]) -> dict[str, dict]:
    """Per method (``results[name]``: one list of turn records per chat, chats in the same order
    for every method): codes recalled, answers equal to the full cache's (questions and all turns),
    the questions only this method or only the full cache got right with their sign test, the KV MB
    held after each turn (mean over chats) and the mean time per plan."""
    summary = {}
    for name, runs in results.items():
        pairs = [(r, f) for run, ref in zip(runs, results["full"]) for r, f in zip(run, ref)]
        asked = [(r, f) for r, f in pairs if r["expect"]]
        only_this = sum(r["ok"] and not f["ok"] for r, f in asked)
        only_full = sum(f["ok"] and not r["ok"] for r, f in asked)
        summary[name] = {
            "accuracy": float(np.mean([r["ok"] for r, _ in asked])),
            "right": int(sum(r["ok"] for r, _ in asked)), "asked": len(asked),
            "same_as_full": int(sum(r["answer"] == f["answer"] for r, f in pairs)), "turns": len(pairs),
            "same_as_full_asked": int(sum(r["answer"] == f["answer"] for r, f in asked)),
            "only_this_right": int(only_this), "only_full_right": int(only_full),
            "sign_test_p": _sign_test(only_this, only_full),
            "kv_mb_by_turn": [float(np.mean([run[t]["kv_bytes"] for run in runs]) / 2**20) for t in range(len(runs[0]))],
            "plan_ms": float(np.mean([r["plan_ms"] for run in runs for r in run if r["plans"]] or [0.0])),
            "same_by_turn": [int(sum(run[t]["answer"] == ref[t]["answer"] for run, ref in zip(runs, results["full"])))
                             for t in range(len(runs[0]))],
            "first_differing_turn": [next((t + 1 for t, (r, f) in enumerate(zip(run, ref)) if r["answer"] != f["answer"]),
                                          None) for run, ref in zip(runs, results["full"])],
        }
    return summary


HEADERS = ["method", "codes recalled (turns 6-10)", "only it right / only full right (sign test p)",
           "answers = full's (questions)", "answers = full's (all turns)", "KV MB after turn 1", "after turn 5",
           "after turn 10", "ms per plan"]


def _rows(summary: dict[str, dict]) -> list[list]:
    return [[name, f"{s['right']}/{s['asked']}",
             "-" if name == "full" else f"{s['only_this_right']} / {s['only_full_right']} (p = {s['sign_test_p']:.2f})",
             f"{s['same_as_full_asked']}/{s['asked']}", f"{s['same_as_full']}/{s['turns']}",
             f"{s['kv_mb_by_turn'][0]:.1f}", f"{s['kv_mb_by_turn'][4]:.1f}", f"{s['kv_mb_by_turn'][-1]:.1f}",
             f"{s['plan_ms']:.0f}"] for name, s in summary.items()]


def conversation_markdown(split: str, config: ReFreeKVConfig, results: dict, summary: dict) -> str:
    """The report of ``run_conversation`` (also rebuilt from its saved JSON: ``summarize(out["runs"])``)."""
    count = len(results["full"])
    per_turn = [[name, *(int(r["ok"]) if r["ok"] is not None else "-" for r in run)]
                for name, runs in results.items() for run in runs]
    same = [[name, *s["same_by_turn"], sum(t is None for t in s["first_differing_turn"]),
             ", ".join(str(t) for t in sorted(t for t in s["first_differing_turn"] if t is not None)) or "-"]
            for name, s in summary.items() if name != "full"]
    return (f"# refreekv eval: conversation task, {split} split ({count} conversations of 10 turns)\n\n"
            f"Configuration: {config}\n\n" + markdown_table(HEADERS, _rows(summary)) + "\n\n## Answers equal to "
            f"the full cache's, per turn (of {count} chats)\n\n"
            + markdown_table(["method", *map(str, range(1, 11)), "chats identical all through",
                              "first differing turn of the others"], same)
            + "\n\n## Right answers per turn (1 right, 0 wrong, - a reading turn)\n\n"
            + markdown_table(["method", *map(str, range(1, 11))], per_turn))


def _with(cfg: ReFreeKVConfig, **changes) -> ReFreeKVConfig:
    return ReFreeKVConfig(**{**cfg.to_dict(), **changes})


@torch.no_grad()
def run_generation(split: str, out_dir: str, tokens: int = 1024, every: int = 128, as_json: bool = False,
                   default: ReFreeKVConfig | None = None) -> dict:
    from rich.console import Console
    from transformers import DynamicCache

    from refreekv.adapters.transformers import ReFreeKVCache, cache_kwarg, refreekv_hooks

    from .prompts import chat as chat_prompt
    from .runner import kl_top1

    console = Console(stderr=as_json)
    model, tok = load_torch()
    key = cache_kwarg(model)
    base = ReFreeKVConfig() if default is None else default
    prompt = chat_prompt(tok, filler(tok, split, 600, 90_000) + "\n\nContinue this essay in the same style, at length.")
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    console.print(f"full cache: greedy {tokens} tokens after a {n}-token prompt")
    full = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                          min_new_tokens=tokens)
    target = full[0, n:].tolist()
    methods = {"full": None, "compress once": _with(base, replan="once", replan_every=0),
               f"re-plan every {every} tokens": _with(base, replan="once", replan_every=every)}
    logits, held, plans = {}, {}, {}
    for name, cfg in methods.items():
        console.print(f"teacher-forced: {name}")
        cache = DynamicCache(config=model.config) if cfg is None else ReFreeKVCache(model, cfg)
        steps, sizes = [], []
        t0 = time.perf_counter()
        with refreekv_hooks(model):
            out = model(input_ids=ids, **{key: cache}).logits[:, -1]
            steps.append(out[0].float())
            for i, tkn in enumerate(target[:-1]):
                out = model(input_ids=torch.tensor([[tkn]]), attention_mask=torch.ones(1, n + i + 1, dtype=torch.long),
                            **{key: cache}).logits[:, -1]
                steps.append(out[0].float())
                if (i + 1) % 64 == 0:
                    sizes.append(_held(cache))
        logits[name], held[name] = torch.stack(steps), sizes
        plans[name] = {"plans": len(cache.history.plans) if cfg is not None else 0,
                       "plan_ms": 1e3 * float(np.mean([p.seconds for p in cache.history.plans])) if cfg is not None else 0.0,
                       "seconds": time.perf_counter() - t0}
    rows, summary = [], {}
    for name in methods:
        kl, top1 = kl_top1(logits["full"], logits[name])
        summary[name] = {"kl": kl, "top1": top1, "kv_mb_every_64": [b / 2**20 for b in held[name]], **plans[name]}
        rows.append([name, f"{kl:.4f}", f"{top1:.3f}", f"{held[name][-1] / 2**20:.1f}", plans[name]["plans"],
                     f"{plans[name]['plan_ms']:.0f}", f"{plans[name]['seconds']:.0f}"])
    headers = ["method", "KL vs full", "top-1 agreement", "KV MB at the end", "plans", "ms per plan", "seconds"]
    md = (f"# refreekv eval: generation task, {split} split\n\n{tokens} tokens generated by the full cache after a "
          f"{n}-token prompt, then teacher-forced one token at a time on each method.\n\nConfiguration: {base}\n\n"
          + markdown_table(headers, rows))
    out = {"split": split, "prompt_tokens": n, "tokens": tokens, "every": every, "config": base.to_dict(),
           "summary": summary}
    write(out_dir, f"eval_generation_{split}", out, md)
    _plot_bytes({k: v["kv_mb_every_64"] for k, v in summary.items()}, f"{out_dir}/eval_generation_{split}.png",
                "generated tokens / 64", "KV cache held (MB)")
    if not as_json:
        console.print(rich_table("long generation", ["method", "KL", "top-1", "MB end", "plans"],
                                 [r[:5] for r in rows]))
    return out


def _plot_bytes(series: dict, path: str, xlabel: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", ms=3, label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
