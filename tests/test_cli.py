"""The refreekv command: clear argument errors, stable --json schemas, tiny runs of each command."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refreekv import ReFreeKVConfig
from refreekv.cli import main


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--threshold", "1.5"], "threshold: received 1.5; expected a number T with 0 <= T < 1"),
    (["demo", "--sinks", "-2"], "sinks: received -2; expected an int >= 0"),
    (["demo", "--halting", "ratio"], 'budget: received None; expected a ratio 0 < budget <= 1 for halting="ratio"'),
    (["demo", "--retained-layers", "0,99"], "retained_layers: received (0, 99); expected indices below the model's number of layers (30)"),
    (["bench", "--lengths", "1k"], "received '1k'; expected comma-separated integers"),
    (["bench", "--lengths", "4"], "--lengths: received 4; expected prompt lengths >= 8"),
    (["bench", "--mlx-lengths", "256,2"], "--mlx-lengths: received 256,2; expected prompt lengths >= 8"),
    (["bench", "--device", "tpu"], "--device: received 'tpu'; expected cpu, or cuda[:N] on a machine with CUDA"),
    (["inspect", "--file", "/nonexistent.txt"], "--file: received '/nonexistent.txt'; expected an existing text file"),
    (["inspect", "  "], "text: received an empty prompt"),
    (["demo", "--prompt", " "], "--prompt: received an empty prompt; expected some text"),
    (["demo", "--prompt-file", "/nonexistent.txt"], "--prompt-file: received '/nonexistent.txt'; expected an existing text file"),
    (["demo", "--quick", "--prompt", "Hi"], "--quick: received with --prompt/--prompt-file; expected one of them"),
    (["eval", "--methods", "everything"], "invalid choice: 'everything'"),
    (["eval", "--query-rows", "abc"], "received 'abc'; expected an int (a count) or a float in (0, 1)"),
    (["demo", "--query-rows", "1.5"], "query_rows: received 1.5; expected an int >= 1"),
    (["eval", "--limit", "0"], "--limit: received 0; expected an int >= 1"),
    (["eval", "--max-length", "0"], "--max-length: received 0; expected an int >= 1"),
    (["eval", "--min-length", "-5"], "--min-length: received -5; expected an int >= 1"),
    (["eval", "--min-length", "5000", "--max-length", "4096"],
     "--min-length: received 5000 with --max-length 4096; expected at most the maximum"),
    (["eval", "--kinds", "needles"], "received 'needles'; expected comma-separated prompt kinds among needle, "
     "multikey, continuation, open"),
    (["eval", "--kinds", ","], "received ','; expected comma-separated prompt kinds"),
    (["eval", "--max-length", "10"], "--max-length: received 10; expected a filter that keeps some of the holdout split's"),
    (["eval", "--min-length", "5000", "--kinds", "multikey"],
     "--kinds: received multikey; expected a filter that keeps some of the holdout split's prompts (left by the filters "
     "before it: kinds ['needle'], lengths [7500]"),
    (["bench", "--repeat", "0"], "--repeat: received 0; expected an int >= 1"),
    (["bench", "--decode-tokens", "-1"], "--decode-tokens: received -1; expected an int >= 1"),
    (["eval", "--task", "conversation", "--conversations", "0"], "--conversations: received 0; expected an int >= 1"),
    (["eval", "--task", "generation", "--every", "0"], "--every: received 0; expected an int >= 1"),
    (["serve", "--threshold", "1.5", "--", "--port", "8080"], "threshold: received 1.5; expected a number T"),
    (["serve", "--", "--kv-bits", "4"], "--kv-bits: received a quantized KV cache; expected none"),
    (["serve", "--engine", "transformers", "--", "--continuous-batching"],
     "continuous_batching: received True; expected False with ReFreeKV caches (continuous batching keeps its own"),
    (["serve", "--engine", "transformers", "--", "--compile"], "compile: received True; expected False with ReFreeKV"),
    (["serve", "--engine", "transformers", "--", "--bogus"],
     "transformers serve options: received '--bogus'; expected its own options (No such option: --bogus"),
    (["serve", "--engine", "transformers", "--replan", "history", "--prompt-cache-size", "0"],
     "replan: received 'history'; expected \"turns\", \"chat\" or \"once\" with prompt_cache_size=0"),
    (["serve", "--engine", "transformers", "--prompt-cache-size", "-1"], "prompt_cache_size: received -1; expected an int >= 0"),
    (["serve", "--prompt-cache-size", "2"], "--prompt-cache-size: received 2 with --engine mlx-lm; expected it after --"),
    (["serve", "--engine", "vllm"], "--engine: invalid choice"),
    (["chat", "--", "--max-kv-size=512"], "--max-kv-size=512: received a rotating KV window; expected none"),
    (["chat", "--replan", "sometimes", "--"], "--replan: invalid choice"),
])
def test_argument_errors_are_clear(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_files_and_folders_that_cannot_be_used_are_usage_errors(capsys, tmp_path):
    """A prompt file that is not UTF-8, and an --out that is a file or sits under one: one usage error
    naming the flag, before any model loads (was a UnicodeDecodeError / FileExistsError traceback)."""
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    taken = tmp_path / "taken.txt"
    taken.write_text("a file, not a folder")
    for argv, message in (
            (["demo", "--prompt-file", str(latin)], "--prompt-file: received '%s', which is not UTF-8 text (byte 3)" % latin),
            (["inspect", "--file", str(latin)], "--file: received '%s', which is not UTF-8 text" % latin),
            (["demo", "--prompt", "Hi", "--out", str(taken)], "--out: received '%s', an existing file" % taken),
            (["inspect", "Hi", "--out", str(taken / "sub")], "('%s' is not a folder)" % taken),
            (["eval", "--task", "conversation", "--out", str(taken)], "--out: received '%s', an existing file" % taken)):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err, argv


@pytest.mark.model
def test_inspect_json_schema(capsys, tmp_path):
    out = run_json(capsys, "inspect", "The quick brown fox jumps over the lazy dog. " * 20, "--no-plot",
                   "--out", str(tmp_path))
    assert set(out) == {"tokens", "config", "budget", "layers"}
    assert ReFreeKVConfig.from_dict(out["config"]) == ReFreeKVConfig()  # the config as data, not a repr
    assert len(out["layers"]) == 30 and out["tokens"] > 100
    for layer in out["layers"]:
        assert set(layer) == {"layer", "kept", "budget", "retained", "cut_if_compressed"}
        assert 1 <= layer["kept"] <= out["tokens"]
    assert out["layers"][0]["retained"] and out["layers"][0]["kept"] == out["tokens"]
    saved = json.loads((tmp_path / "inspect.json").read_text())
    assert len(saved["ratio_curves"]) == 30 and (tmp_path / "inspect.md").exists()


@pytest.mark.model
def test_inspect_raw_and_plot(capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time there was a tiny model. " * 10)
    out = run_json(capsys, "inspect", "--file", str(prompt), "--raw", "--threshold", "0.05", "--out", str(tmp_path))
    assert out["config"]["threshold"] == 0.05
    assert out["tokens"] < 120 and (tmp_path / "inspect.png").stat().st_size > 10_000


@pytest.mark.model
def test_demo_quick(capsys, tmp_path):
    out = run_json(capsys, "demo", "--quick", "--max-new-tokens", "8", "--out", str(tmp_path))
    assert [p["prompt"] for p in out["prompts"]] == ["needle ~200 tokens, depth 50%", "short question"]
    for p in out["prompts"]:
        assert {"tokens", "budget", "memory_saved", "answer_full", "answer_refreekv", "same_as_full",
                "refreekv_correct"} <= set(p)
        assert 0 < p["budget"] <= 1 and p["kv_bytes_refreekv"] <= p["kv_bytes_full"]
        assert p["same_as_full"] == (p["answer_full"] == p["answer_refreekv"])
        # closeness on the full cache's answer: an identical answer agrees on every forced token
        assert 0 <= p["forced_top1_agreement"] <= 1 and p["forced_kl"] >= -1e-6
        assert (p["differs_at_token"] is None) == p["same_as_full"]
        if p["same_as_full"]:
            assert p["forced_top1_agreement"] == 1.0
    assert "answers as the full cache" in out["summary"] and "KV memory saved" in out["summary"]
    assert "top-1 agreement" in out["summary"]
    # at T = 0 the cache is the full cache: same answers, zero KL
    zero = run_json(capsys, "demo", "--quick", "--max-new-tokens", "8", "--threshold", "0", "--out", str(tmp_path))
    for p in zero["prompts"]:
        assert p["same_as_full"] and p["forced_top1_agreement"] == 1.0 and abs(p["forced_kl"]) < 1e-5
    assert (tmp_path / "demo.md").exists()


@pytest.mark.model
def test_demo_on_your_own_prompts(capsys, tmp_path):
    """--prompt and --prompt-file replace the demo's prompts; the full cache's answer is the reference
    (nothing to be right about), and T = 0 gives it back."""
    f = tmp_path / "p.txt"
    f.write_text("Name the three primary colours.")
    out = run_json(capsys, "demo", "--prompt", "What is the capital of Italy?", "--prompt-file", str(f),
                   "--max-new-tokens", "6", "--threshold", "0", "--out", str(tmp_path))
    assert [p["prompt"] for p in out["prompts"]] == ["your prompt 1: 'What is the capital of Italy?'",
                                                     "your prompt 2: 'Name the three primary colours.'"]
    assert all(p["same_as_full"] and p["expected"] == "" and p["refreekv_correct"] is None for p in out["prompts"])
    assert out["summary"].startswith("2/2 answers as the full cache; KV memory saved")


@pytest.mark.model
def test_eval_quick_and_its_cache(capsys, tmp_path):
    out = run_json(capsys, "eval", "--methods", "quick", "--split", "dev", "--size", "quick", "--threshold", "0.02",
                   "--out", str(tmp_path))
    res = out["results"]
    assert set(res) == {"full", "refreekv (default)", "refreekv (evicting)", "refreekv (paper)", "streamingllm 20%"}
    assert out["configs"]["refreekv (default)"]["threshold"] == 0.02  # the options configure the default
    assert res["full"]["budget"] == 1.0 and res["full"]["cont_kl"] == 0.0 and res["full"]["cont_top1"] == 1.0
    assert abs(res["streamingllm 20%"]["budget"] - 0.2) < 0.02
    for r in res.values():
        assert {"needle", "multikey", "cont_ppl", "cont_kl", "open_similarity", "budget", "kv_memory_saved"} <= set(r)
    assert (tmp_path / "eval_quick_dev_quick.png").exists()
    cached = (tmp_path / "eval_cache.jsonl").read_text().count("\n")
    again = run_json(capsys, "eval", "--methods", "quick", "--split", "dev", "--size", "quick", "--threshold", "0.02",
                     "--out", str(tmp_path))
    assert again["results"] == res and (tmp_path / "eval_cache.jsonl").read_text().count("\n") == cached  # no recompute
    # --kinds keeps only those prompts, from the same cache: the continuation numbers are the same
    cont = run_json(capsys, "eval", "--methods", "quick", "--split", "dev", "--size", "quick", "--threshold", "0.02",
                    "--kinds", "continuation", "--out", str(tmp_path))
    assert (tmp_path / "eval_cache.jsonl").read_text().count("\n") == cached
    assert cont["kinds"] == ["continuation"] and 0 < cont["prompts"] < out["prompts"]
    for name, r in cont["results"].items():
        assert "needle" not in r and r["cont_kl"] == res[name]["cont_kl"]
    assert (tmp_path / "eval_quick_dev_quick_continuation.png").exists()


def test_every_command_takes_the_configuration_and_shows_defaults(capsys):
    from refreekv.cli import config_from, parser

    for command in (["demo"], ["inspect", "x"], ["eval"], ["bench"], ["serve"]):
        a = parser().parse_args([*command, "--threshold", "0.02", "--query-rows", "8", "--replan", "turns"])
        cfg = config_from(a)
        assert (cfg.threshold, cfg.query_rows, cfg.replan) == (0.02, 8, "turns")
    assert config_from(parser().parse_args(["demo", "--paper"])) == ReFreeKVConfig.paper()
    assert config_from(parser().parse_args(["demo", "--evicting"])) == ReFreeKVConfig.evicting()
    assert config_from(parser().parse_args(["demo"])) == ReFreeKVConfig()
    assert config_from(parser().parse_args(["demo", "--tail-bits", "none"])) == ReFreeKVConfig(tail_bits=None)
    assert config_from(parser().parse_args(["demo", "--paper", "--tail-bits", "4"])) == ReFreeKVConfig.paper(tail_bits=4)
    for bad in (["--tail-bits", "3"], ["--tail-bits", "eight"], ["--paper", "--evicting"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["demo", *bad])
    with pytest.raises(SystemExit):
        parser().parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    assert "(default 0.01)" in text and "(default 8;" in text and "(default: holdout)" in text and "--replan-every" in text


@pytest.mark.model
def test_bench_tiny(capsys, tmp_path):
    out = run_json(capsys, "bench", "--lengths", "256", "--synthetic", "512", "--mlx-lengths", "",
                   "--decode-tokens", "2", "--repeat", "1", "--out", str(tmp_path))
    (row,) = out["model"]
    assert row["n"] == 256 and row["kv_bytes_refreekv"] < row["kv_bytes_full"]
    # the default keeps what it evicts as 8-bit codes: more bytes than the kept share, fewer than the full cache,
    # exactly what the reference counts
    assert row["budget"] < row["bytes_ratio"] < 1 and abs(row["bytes_ratio"] - row["bytes_expected_ratio"]) < 1e-9
    assert out["device"] == "cpu" and row["overhead_ms"] == row["hook_ms"] > 0  # on CPU the hooks' own time
    assert row["peak_mb_refreekv"] > 0 and row["peak_mb_full"] > 0
    assert {r["backend"] for r in out["planning_synthetic"]} >= {"numpy", "torch-cpu"}
    assert set(out["targets"][0]) == {"n", "overhead < 1% of prefill (n >= 2k)", "evict within 2x of a plain copy",
                                      "KV bytes = kept (+ tail) as the reference counts them", "decode not slower than full"}


def test_console_script_is_installed():
    exe = shutil.which("refreekv") or str(Path(sys.executable).parent / "refreekv")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("demo", "inspect", "eval", "bench"))


def test_kinds_are_parsed_once_each_in_order():
    from refreekv.cli import _kinds

    assert _kinds("open, continuation,open") == ["open", "continuation"]


@pytest.mark.parametrize("argv, missing, extra", [(["chat", "--"], "mlx_lm", "mlxlm"), (["serve"], "mlx_lm", "mlxlm"),
                                                  (["serve", "--engine", "transformers"], "fastapi", "hfserve"),
                                                  (["demo", "--quick"], "transformers", "hf")])
def test_a_missing_engine_is_one_usage_error(capsys, monkeypatch, argv, missing, extra):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"received an environment without {missing}; expected it installed (pip install 'refreekv[{extra}]')" in err
