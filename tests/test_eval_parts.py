"""The evaluation's building blocks: fixed splits from disjoint material, the results cache, batched
decoding equal to one-by-one decoding, and the serving-capacity arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refreekv import ReFreeKVConfig
from refreekv.commands import runner
from refreekv.commands.prompts import essays
from refreekv.commands.tasks import SPLITS, build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from refreekv.commands.models import exported_model_dir

    return AutoTokenizer.from_pretrained(exported_model_dir())


@pytest.mark.model
def test_the_splits_share_no_material(tok):
    dev, test = set(SPLITS["dev"].essays), set(SPLITS["test"].essays)
    assert not dev & test
    for one, other in (("dev", "test"), ("dev", "holdout"), ("test", "holdout")):
        x, y = SPLITS[one], SPLITS[other]
        assert not {s for s, _ in x.needles} & {s for s, _ in y.needles}
        assert not {q for _, q in x.needles} & {q for _, q in y.needles}
        assert not set(x.names) & set(y.names) and not set(x.open_questions) & set(y.open_questions)
        assert x.seed != y.seed
    # the holdout's texts are not essays: no 12-word run of theirs occurs in any essay
    essay_runs = {tuple(w[i:i + 12]) for e in essays() for w in [e.split()] for i in range(0, len(w) - 11, 6)}
    for text in SPLITS["holdout"].documents():
        w = text.split()
        assert len(w) > 5000 and not {tuple(w[i:i + 12]) for i in range(len(w) - 11)} & essay_runs
    a, b, c = build(tok, "dev", "full"), build(tok, "test", "full"), build(tok, "holdout", "full")
    assert sum(p.kind == "needle" for p in a) == 60 == sum(p.kind == "needle" for p in b) == \
        sum(p.kind == "needle" for p in c)
    assert [(p.kind, p.length) for p in a] == [(p.kind, p.length) for p in c]  # the same grid
    assert {p.length for p in a if p.kind == "needle"} == {1024, 2048, 4096, 7500}
    assert not {p.text for p in c} & {p.text for p in a + b}
    for p in a + b + c:
        if p.kind == "needle":
            n = len(tok(p.text)["input_ids"])
            assert abs(n - p.length) <= 0.05 * p.length + 40, (p.id, n)  # lengths are token lengths
            assert p.expect in p.text
    assert build(tok, "test", "full") == b and build(tok, "holdout", "full") == c  # the same prompts every time


def test_results_cache_keys_change_with_the_code_and_the_config(tmp_path):
    from refreekv.commands.tasks import Prompt

    p = Prompt("x", "needle", "text", "1", 10)
    k1 = runner.ResultsCache.key(p, ReFreeKVConfig(), "code-a")
    assert k1 != runner.ResultsCache.key(p, ReFreeKVConfig(), "code-b")
    assert k1 != runner.ResultsCache.key(p, ReFreeKVConfig(threshold=0.02), "code-a")
    # eval plans once after the prompt: "once" and "turns" give the same result, "history" keeps the prompt whole
    assert k1 == runner.ResultsCache.key(p, ReFreeKVConfig(replan="once", replan_every=8), "code-a")
    assert k1 != runner.ResultsCache.key(p, ReFreeKVConfig(replan="history"), "code-a")
    store = runner.ResultsCache(tmp_path / "c.jsonl")
    store.put(k1, {"ok": True})
    (tmp_path / "c.jsonl").write_text((tmp_path / "c.jsonl").read_text() + '{"truncated')  # an interrupted run
    again = runner.ResultsCache(tmp_path / "c.jsonl")
    assert again.get(k1)["ok"] is True and len(again.records) == 1


def test_method_groups_never_run_one_setting_twice():
    # two names whose configurations differ only in re-planning (which eval never does) are one setting:
    # the first name stays, the second goes, a real difference stays
    table = {"full": None, "a": ReFreeKVConfig(), "b": ReFreeKVConfig(replan="once"),
             "c": ReFreeKVConfig(threshold=0.001), "d": None}
    assert list(runner._distinct(table)) == ["full", "a", "c"]
    # a variant equal to the default is not run twice (the default before round three was "k=32 T=0.1%")
    assert "k=32 T=0.1%" in runner.methods("variants") and "k=32 T=0.1%" in runner.variants()
    assert "k=32 T=0.1%" not in runner.methods("variants", ReFreeKVConfig.evicting(heads="mean", threshold=0.001))
    thresholds = runner.methods("thresholds")  # the threshold curve next to the whole fixed-budget front
    curve = set(runner.thresholds())  # none is the default since round four (heads="each")
    assert curve < set(thresholds) and len(thresholds) == 2 + len(curve) + 27
    for group in ("main", "variants", "candidates", "thresholds", "options", "heads", "holdout", "ablations", "quick"):
        assert runner.methods(group)["refreekv (default)"] == ReFreeKVConfig()
    # options: the three rules round three chose among, each with the heads="mean" of its time; the
    # round-three default among them is reported as the default when it is passed as the default
    assert list(runner.methods("options")) == ["full", "refreekv (default)", "l2 T=0.1%", "l2 T=0.05%", "l2 T=0.1% mass 3%"]
    old = ReFreeKVConfig.evicting(heads="mean", threshold=0.0005)
    assert runner.options()["l2 T=0.05%"] == old and "l2 T=0.05%" not in runner.methods("options", old)
    # round four: the candidate that qualified is the eviction rule (the default of its time)
    assert runner.heads()["each T=0.125%"] == ReFreeKVConfig.evicting()
    assert list(runner.methods("heads", ReFreeKVConfig.evicting())) == \
        ["full", "refreekv (default)", "each T=0.1%", "each T=0.2%"]
    # round five: the paper's boundary with an 8-bit tail is the default, so the tail group runs it once
    assert runner.tail()["paper, tail 8-bit"] == ReFreeKVConfig.paper(tail_bits=8)
    assert list(runner.methods("tail")) == ["full", "refreekv (default)", "refreekv (evicting)", "refreekv (paper)",
                                            "paper, tail 4-bit", "evicting, tail 8-bit"]
    # the historical groups keep T = 0.1 % where rounds one and two meant the default of their time
    assert runner.candidates()["k=32 T=0.1% max-rows"].threshold == 0.001
    assert all(cfg.threshold == 0.001 for name, cfg in runner.thresholds().items() if "T=0.1%" in name)
    assert all(cfg.heads in ("mean", "max") for group in (runner.candidates, runner.thresholds, runner.options)
               for cfg in group().values())
    holdout = runner.methods("holdout")
    assert list(holdout)[:4] == ["full", "refreekv (default)", "refreekv (evicting)", "refreekv (paper)"]
    assert len(holdout) == 10
    assert holdout["l2 T=0.1% (default before round three)"] == ReFreeKVConfig.evicting(heads="mean", threshold=0.001)
    assert holdout["l2 T=0.05% (default before round four)"] == ReFreeKVConfig.evicting(heads="mean", threshold=0.0005)
    # a mass floor that is off leaves a record's settings (and so its results-cache key) as before the field
    assert "mass_threshold" not in runner.ResultsCache.settings(ReFreeKVConfig())
    assert runner.ResultsCache.settings(ReFreeKVConfig(mass_threshold=0.03))["mass_threshold"] == 0.03
    # a --threshold etc. on the command line replaces the default; a candidate equal to it is dropped
    assert list(runner.methods("candidates", ReFreeKVConfig.evicting(heads="mean", threshold=0.0005))) == \
        ["full", "refreekv (default)", "k=32 T=0.1% max-rows", "k=32 T=0.3% max-heads"]


def test_conversation_summary_counts_against_the_full_cache():
    from refreekv.commands.conversation import _sign_test, summarize

    def turn(answer, expect, ok, plans=0):
        return {"answer": answer, "expect": expect, "ok": ok, "kv_bytes": 2**20, "plans": plans, "plan_ms": 10.0 * plans}

    full = [[turn("read", "", None), turn("1234", "1234", True), turn("99", "5678", False)]]
    mine = [[turn("read!", "", None, 1), turn("1234", "1234", True, 1), turn("5678", "5678", True, 1)]]
    s = summarize({"full": full, "mine": mine})
    assert s["full"]["same_as_full"] == 3 and s["full"]["only_this_right"] == 0
    m = s["mine"]
    assert (m["right"], m["asked"], m["same_as_full_asked"], m["same_as_full"], m["turns"]) == (2, 2, 1, 1, 3)
    assert (m["only_this_right"], m["only_full_right"], m["plan_ms"]) == (1, 0, 10.0)
    assert m["same_by_turn"] == [0, 1, 0] and m["first_differing_turn"] == [1]
    assert s["full"]["same_by_turn"] == [1, 1, 1] and s["full"]["first_differing_turn"] == [None]
    assert _sign_test(9, 3) == pytest.approx(0.14599609375) and _sign_test(3, 9) == _sign_test(9, 3)
    assert _sign_test(0, 0) == 1.0 and _sign_test(5, 5) == 1.0


@pytest.mark.model
@torch.no_grad()
def test_batched_decoding_equals_one_by_one():
    from refreekv.adapters.transformers import ReFreeKVCache, capture_prefill
    from refreekv.commands.models import load_torch
    from refreekv.commands.prompts import chat, needle_prompt

    model, tok = load_torch()
    ids = tok([chat(tok, needle_prompt(300, 0.4, number=5152))], return_tensors="pt")["input_ids"]
    cfgs = [None, ReFreeKVConfig(), ReFreeKVConfig.paper(), runner.fixed("snapkv", 0.3)]
    pre = capture_prefill(model, ids, configs=[c for c in cfgs if c is not None])
    caches = lambda: [runner._fork(pre.cache) if c is None else ReFreeKVCache.from_prefill(pre, c) for c in cfgs]  # noqa: E731
    n = ids.shape[1]
    together = runner.greedy_many(model, tok, caches(), pre.logits, n, 12)
    alone = [runner.greedy(model, tok, c, pre.logits, n, 12) for c in caches()]
    assert [d.tokens for d in together] == [d.tokens for d in alone]


def test_serving_capacity_arithmetic(tmp_path):
    records = {"full": [{"n": 100, "budget": 1.0, "kept_per_layer": [100, 100]}],
               "half": [{"n": 100, "budget": 0.5, "kept_per_layer": [100, 4]}]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    out = subprocess.run([sys.executable, str(ROOT / "scripts/serving_capacity.py"), str(path), "--block", "16",
                          "--gen", "28"], capture_output=True, text=True, check=True).stdout
    # full: 2 layers x ceil(128 / 16) = 16 blocks; compaction: 8 + ceil(32 / 16) = 10 -> 1.60x;
    # in place: the most demanding layer keeps every token -> no gain
    assert "| full | 100.0% | 100.0% | 1.00x | 1.00x |" in out
    assert "| half | 50.0% | 62.5% | 1.60x | 1.00x |" in out


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_error_curve_equals_attention_over_the_kept_tokens():
    # scripts/output_error_halting.py computes every cut's output from cumulative sums; here each cut's
    # output is attention computed again over the kept columns only, in float64
    oe = _script("output_error_halting")
    g = torch.Generator().manual_seed(0)
    H, Hkv, n, k, d, sinks = 4, 2, 19, 3, 8, 2
    q, K, V = (torch.randn(1, h, m, d, generator=g) for h, m in ((H, k), (Hkv, n), (Hkv, n)))
    E = oe.output_error_curve(q, K, V, sinks)
    assert E.shape == (n - sinks,)
    qd, Kd, Vd = (x.double()[0] for x in (q, K, V))
    Kd, Vd = Kd.repeat_interleave(H // Hkv, 0), Vd.repeat_interleave(H // Hkv, 0)
    for j in range(1, n - sinks + 1):  # the j oldest candidates evicted
        errs = []
        for h in range(H):
            for i in range(k):
                pos = n - k + i
                seen = list(range(pos + 1))
                kept = [c for c in seen if c < sinks or c >= sinks + j]
                logits = Kd[h] @ qd[h, i] / d ** 0.5
                o = torch.softmax(logits[seen], 0) @ Vd[h, seen]
                o_kept = torch.softmax(logits[kept], 0) @ Vd[h, kept] if kept else torch.zeros(d, dtype=torch.float64)
                errs.append(float((o_kept - o).norm() / o.norm()))
        assert abs(float(E[j - 1]) - sum(errs) / len(errs)) < 1e-4, j
    assert oe.newest_run(torch.tensor([0.01, 0.02, 0.5, 0.01]), 0.05) == 2  # evict up to the first error > T
    assert oe.newest_run(torch.tensor([0.01, 0.02]), 0.05) == 0


@pytest.mark.parametrize("argv,message", [
    (["--thresholds", "a,b"], "--thresholds: received 'a,b'; expected comma-separated numbers"),
    (["--thresholds", "0.5,1.5"], "--thresholds: received '0.5,1.5'; expected numbers T with 0 < T < 1"),
    (["--thresholds", ","], "--thresholds: received ','; expected numbers T with 0 < T < 1"),
    (["--limit", "0"], "--limit: received 0; expected an int >= 1"),
    (["--split", "train"], "invalid choice: 'train'")])
def test_exploratory_scripts_refuse_bad_arguments(argv, message, capsys):
    from refreekv.commands.explore import continuation_args

    with pytest.raises(SystemExit):
        continuation_args("x", "0.001", argv)
    assert message in capsys.readouterr().err
    a, Ts = continuation_args("x", "0.001,0.0005", ["--split", "test", "--limit", "2"])
    assert (a.split, a.limit, a.out, Ts) == ("test", 2, "results", [0.001, 0.0005]) and not hasattr(a, "max_length")


def test_exploratory_max_length_is_checked(capsys):
    from refreekv.commands.explore import continuation_args

    assert continuation_args("x", "0.001", [], max_length=4096)[0].max_length == 4096
    assert continuation_args("x", "0.001", ["--max-length", "1024"], max_length=4096)[0].max_length == 1024
    with pytest.raises(SystemExit):
        continuation_args("x", "0.001", ["--max-length", "0"], max_length=4096)
    assert "--max-length: received 0; expected an int >= 1" in capsys.readouterr().err


def test_score_selection_keeps_the_count_and_picks_by_score():
    # scripts/score_selection.py: the default's count per layer, tokens chosen by a score instead of recency
    sel = _script("score_selection").selected
    scores = torch.tensor([[[9.0, 0.0, 5.0, 1.0, 7.0, 2.0, 3.0, 0.5, 4.0, 6.0],
                            [0.0, 8.0, 1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]])  # (1, Hkv=2, n=10)
    # sinks 1, window 2: position 0, the newest 8 and 9, then the best scores among 1..7
    assert sel(scores, 5, 1, 2, "score").tolist() == [[[0, 2, 4, 8, 9], [0, 1, 3, 8, 9]]]
    assert sel(scores, 7, 1, 2, "score").tolist() == [[[0, 2, 4, 5, 6, 8, 9], [0, 1, 3, 6, 7, 8, 9]]]
    # half: sinks 1, the newest (7 - 1) // 2 = 3, then the best three among 1..6, per head
    assert sel(scores, 7, 1, 2, "half").tolist() == [[[0, 2, 4, 6, 7, 8, 9], [0, 1, 3, 6, 7, 8, 9]]]
    assert sel(scores, 10, 1, 2, "score").tolist() == [[list(range(10))] * 2]
    with pytest.raises(ValueError, match="mode: received 'random'"):
        sel(scores, 5, 1, 2, "random")


@pytest.mark.model
def test_kl_sources_on_a_short_prompt():
    from refreekv.commands.models import load_torch
    from refreekv.commands.tasks import Prompt, filler

    ks = _script("kl_sources")
    model, tok = load_torch()
    text = filler(tok, "dev", 400, 0)
    prompt = Prompt("short", "continuation", text[:-200], "", 300, target=text[-200:])
    whole = ks.one_prompt(model, tok, prompt, ReFreeKVConfig(threshold=0.0))
    # T = 0 is the full cache: every layer whole, nothing to give back
    assert whole["kept"] == [whole["n"]] * len(whole["kept"]) and whole["kl"] < 1e-9
    assert whole["kl_with_layer_whole"] == {} and whole["evicted_mass"] == {}
    cut = ks.one_prompt(model, tok, prompt, ReFreeKVConfig(threshold=0.05))
    compressed = {str(i) for i, k in enumerate(cut["kept"]) if k < cut["n"]}
    assert compressed and set(cut["kl_with_layer_whole"]) == compressed and cut["kl"] > 0
    assert min(cut["kl_with_layer_whole"].values()) < cut["kl"]  # giving a layer back removes some of the KL
    assert set(cut["evicted_mass"]) == compressed and all(0 <= v <= 1 for v in cut["evicted_mass"].values())
    assert 0 < cut["top5_share"] <= 1 and cut["worst_token"]["kl"] > 0
    with pytest.raises(ValueError, match="continuation of at least 2 tokens"):
        ks.one_prompt(model, tok, Prompt("empty", "continuation", text, "", 400), ReFreeKVConfig())


@pytest.mark.model
def test_needle_sources_refuses_other_prompts_and_agrees_at_a_tiny_threshold(tmp_path, capsys):
    ns = _script("needle_sources")
    for bad, message in (("train/needle/1024/d0.1/p0", "expected an id that starts with dev/ or test/"),
                         ("dev/continuation/2048/0", "expected a needle or multi-key id of the dev split")):
        with pytest.raises(SystemExit):
            ns.main([bad, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err
    ns.main(["dev/needle/1024/d0.5/p0", "--threshold", "0.00001", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "needle_sources_dev_needle_1024_d0.5_p0.json").read_text())
    answers = out["answers"]
    assert answers["compressed"] == answers["full"]  # T = 0.001 %: the cache keeps what the answer needs
    compressed = [i for i, k in enumerate(out["kept"]) if k < out["n"]]
    assert set(answers) == {"full", "compressed"} | {str(i) for i in compressed} | \
        {f"all but {i} (only it compressed)" for i in compressed} | \
        {k for k in answers if k.startswith("all layers that dropped the needle")}
    assert 0 < out["back"] < out["n"]


def test_demo_divergence_refuses_a_bad_token_count(capsys):
    with pytest.raises(SystemExit):
        _script("demo_divergence").main(["--max-new-tokens", "0"])
    assert "--max-new-tokens: received 0; expected an int >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script("demo_divergence").main(["--delays", "4,24"])  # a delay must leave answer tokens to compare
    assert "--delays: received '4,24'; expected comma-separated ints G with 0 < G < --max-new-tokens" in \
        capsys.readouterr().err


def test_answer_reach_counts_newest_first_without_the_sinks(capsys):
    ar = _script("answer_reach")
    # one head, one row over 6 keys, 1 sink: candidates newest first are 0.7, 0.0, 0.1, 0.1, 0.1
    # (squares 0.49, 0, 0.01, 0.01, 0.01; total 0.52)
    w = torch.tensor([[[0.9, 0.1, 0.1, 0.1, 0.0, 0.7]]])
    assert float(ar.needed(w, 6, 1, 0.05)[0, 0]) == pytest.approx(1 / 5)  # 0.49 >= 0.95^2 * 0.52
    assert float(ar.needed(w, 6, 1, 0.01)[0, 0]) == pytest.approx(4 / 5)  # 0.51 >= 0.99^2 * 0.52 > 0.50
    assert float(ar.needed(w, 4, 1, 0.2)[0, 0]) == pytest.approx(2 / 3)  # keys 1..3 only: 0.02 >= 0.8^2 * 0.03
    with pytest.raises(SystemExit):
        ar.main(["--after", "24"])
    assert "--after: received 24; expected an int G with 0 < G < --max-new-tokens (24)" in capsys.readouterr().err


def test_chat_margins_refuses_a_turn_outside_the_chat(capsys):
    with pytest.raises(SystemExit):
        _script("chat_margins").main(["--turn", "11"])
    assert "--turn: received 11; expected a turn from 1 to 10" in capsys.readouterr().err


def test_the_entry_fuzz_finds_no_escape_and_agrees_with_the_reference():
    """scripts/fuzz_entries.py: bad and odd inputs on NumPy, torch and MLX raise ReFreeKVError or plan
    exactly as the reference (a None in a values list escaped as an AttributeError before its fix)."""
    count, compared, problems = _script("fuzz_entries").run()
    assert count == 5247 and compared >= 400
    assert not problems, problems


def test_every_planted_engine_bug_still_matches_its_adapter(capsys):
    # scripts/engine_mutants.py plants each bug by replacing one exact snippet: if an adapter changes so
    # that a snippet no longer occurs exactly once, the list must be updated (the script stops).
    _script("engine_mutants").main(["--list"])
    assert len(capsys.readouterr().out.splitlines()) == 30


def test_a_holdout_text_that_is_not_the_pinned_one_is_refused(tmp_path, monkeypatch):
    """Another version of a text package would silently give other prompts under the name "holdout"."""
    from refreekv import ReFreeKVError
    from refreekv.commands import prompts

    real = prompts._package_dir
    story = (real("reasoning_gym", "") / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
    (tmp_path / "data").mkdir()
    copy = tmp_path / "data" / "in_the_year_2889.txt"
    monkeypatch.setattr(prompts, "_package_dir",
                        lambda name, install: tmp_path if name == "reasoning_gym" else real(name, install))
    try:
        assert "twenty-ninth" in story
        copy.write_text(story.replace("twenty-ninth", "thirtieth", 1), encoding="utf-8")
        prompts.holdout_texts.cache_clear()
        with pytest.raises(ReFreeKVError, match="digest"):
            prompts.holdout_texts()
        copy.write_text("a file with none of the e-book's markers", encoding="utf-8")
        prompts.holdout_texts.cache_clear()
        with pytest.raises(ReFreeKVError, match="cannot be read as pinned"):
            prompts.holdout_texts()
        copy.unlink()
        prompts.holdout_texts.cache_clear()
        with pytest.raises(ReFreeKVError, match="reasoning-gym==0.1.25"):
            prompts.holdout_texts()
    finally:
        prompts.holdout_texts.cache_clear()


def test_diverges_at_names_the_first_differing_answer_token():
    from refreekv.commands.runner import diverges_at

    assert diverges_at([1, 2, 3], [1, 2, 3]) is None
    assert diverges_at([1, 5, 3], [1, 2, 3]) == 1
    assert diverges_at([1, 2], [1, 2, 3]) == 2 and diverges_at([1, 2, 3, 4], [1, 2, 3]) == 3  # one stopped early


def test_the_mlx_chat_transcript_parser_reads_each_turns_answer():
    """scripts/mlx_chat_turns.py reads answers from mlx_lm.chat's terminal output (rich colours, a prompt
    corridor, a speed line after each answer); the sample's bytes are those of a real `mlx_lm chat` run."""
    dashes = "\x1b[38;5;244m" + "─" * 20 + "\x1b[0m\n"
    prompt = dashes + "\n" + dashes + "\x1b[2A\n\x01\x1b[1;35m\x02›\x01\x1b[0m\x02 \n"

    def speed(n):
        return f"  \x1b[38;5;244m{n} tokens · 8.7 tok/s · prompt 12.7 tok/s · peak 0.56 GB\x1b[0m\n"

    out = ("\x1b[34m╭─\x1b[0m mlx_lm.chat\n" + prompt + "The code is 4417.\n" + speed(6)
           + prompt + "First line\nsecond line\n" + speed(4) + prompt + "\x1b[38;5;244mbye\x1b[0m\n")
    assert _script("mlx_chat_turns").answers(out) == ["The code is 4417.", "First line second line"]


@pytest.mark.model
def test_two_processes_exporting_the_model_at_once_both_get_it(tmp_path):
    """On a fresh machine a test run and a script may export the packaged model at the same time
    (it happened: the second rename failed with "Directory not empty", and both had written into one
    ``.tmp`` folder). Each now writes its own folder; the loser of the rename uses the winner's."""
    import os

    code = ("from refreekv.commands.models import exported_model_dir as e; p = e(); "
            "assert (p / 'model.safetensors').exists(); print(p)")
    env = {**os.environ, "REFREEKV_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {str(tmp_path / "SmolLM2-135M-Instruct")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SmolLM2-135M-Instruct"]  # no folder left behind
