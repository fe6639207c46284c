"""Would the engines' tests notice a wrong port? Plant one plausible bug at a time in the transformers or
mlx-lm adapter and run that engine's tests on the copy.

    python scripts/engine_mutants.py [--engine transformers|mlx|serve|all] [--only 0,3] [--list]

For each mutant: copy the working tree (without .git, .venv-kvpress and results) to a temporary folder,
replace one exact snippet of the adapter (each snippet must occur exactly once, or the script stops:
the mutant no longer matches the code), run ``pytest -x`` on ``tests/test_transformers.py``,
``tests/test_mlx_lm.py`` or ``tests/test_transformers_serve.py`` there, and print CAUGHT (a test failed) or MISSED, with the failing test.
docs/results.md ("Planted bugs in the adapters") lists what the tests caught. About 1-3 min per mutant
on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
T, M, S = "adapters/transformers.py", "adapters/mlx_lm.py", "adapters/transformers_serve_engine.py"

#: (engine, name, file, snippet, replacement)
MUTANTS = [
    ("transformers", "kept slots' validity ignored in the layer mask", T,
     "kept = slots[:, None, None, :].expand(B, 1, q_len, J)",
     "kept = torch.ones_like(slots)[:, None, None, :].expand(B, 1, q_len, J)"),
    ("transformers", "new columns of the shared mask off by one", T,
     "new = shared[..., self.compressed_at:self.compressed_at + D]",
     "new = shared[..., self.compressed_at - 1:self.compressed_at + D - 1]"),
    ("transformers", "evicted count off by one", T,
     "self.evicted = virtual_length - self.kept_slots", "self.evicted = virtual_length - self.kept_slots - 1"),
    ("transformers", "score queries rotated at the oldest rows' positions", T,
     "self.hidden[:, -rows:], self.cos[:, -rows:], self.sin[:, -rows:]",
     "self.hidden[:, -rows:], self.cos[:, :rows], self.sin[:, :rows]"),
    ("transformers", "no q_norm in the recomputed queries", T,
     "    if hasattr(module, \"q_norm\"):\n        q = module.q_norm(q)\n", ""),
    ("transformers", "batch_select_indices leaves the slot mask in the old order", T,
     "self.slot_valid = self.slot_valid[indices]", "pass"),
    ("transformers", "left padding ignored", T,
     "    if mask is None:\n        return [0] * batch\n", "    return [0] * batch\n"),
    ("transformers", "every layer captured with one query row", T,
     "rows = 1 if self.refreekv_config.is_retained(idx) else engine.capture_rows(self.refreekv_config, n)",
     "rows = 1"),
    ("transformers", "a re-plan stores the physical length as the virtual one", T,
     "layer.store_compressed(out.keys, out.values, out.valid, layer.get_seq_length(), out.tail)",
     "layer.store_compressed(out.keys, out.values, out.valid, layer.keys.shape[-2], out.tail)"),
    ("transformers", "without a mask, a new token does not see itself", T,
     "new = (u <= (D - q_len) + t)[None, None]", "new = (u < (D - q_len) + t)[None, None]"),
    ("transformers", "plans reused across configurations whatever their ranking", T,
     "key = (tuple(getattr(cfg, f) for f in ORDER_FIELDS), tuple(c.module.layer_idx for c in chunk))",
     "key = tuple(c.module.layer_idx for c in chunk)"),
    ("transformers", "eager additive mask inverted without a shared mask (unreachable through transformers)", T,
     "return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)",
     "return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, torch.finfo(dtype).min)"),
    ("transformers", "a new segment keeps rows generated before it for replan_every", T,
     "            self._generated.clear()\n            self.defer(module, hidden, cos, sin, None)",
     "            self.defer(module, hidden, cos, sin, None)"),
    ("transformers", "a short segment scored with more rows than it has", T,
     "            cfg = dataclasses.replace(cfg, query_rows=min(cfg.rows_for(most), captured))\n        if planned",
     "            pass\n        if planned"),
    ("transformers", "assisted decoding's candidates scored with the prompt", T,
     "        if c:\n            hidden, cos, sin = hidden[:, :-c], cos[:, :-c], sin[:, :-c]\n", ""),
    ("transformers", "assisted decoding's re-sent conversation appended again", T,
     "    if start >= past:\n        return None\n", "    return None\n"),
    ("mlx", "offset set to the stored slots (positions drift after a plan)", M,
     "        self.offset += L\n", "        self.offset = self.stored\n"),
    ("mlx", "planning with the oldest buffered query rows", M,
     "return q[:, :, -rows:].astype(mx.float32)", "return q[:, :, :rows].astype(mx.float32)"),
    ("mlx", "slot positions not updated by a plan (a trim into planned slots keeps the wrong ones)", M,
     "                self.runs = _joined(_slots(self.runs, 0, sinks) + _slots(self.runs, self.stored - recent, self.stored))",
     "                pass"),
    ("mlx", "the short-segment rule off by one", M,
     "self._segment_prompt + 1 <= cfg.sinks", "self._segment_prompt <= cfg.sinks"),
    ("mlx", "one buffered query row too few", M,
     "keep = cfg.rows_needed(10 ** 9)", "keep = cfg.rows_needed(10 ** 9) - 1"),
    ("mlx", "saved arrays' digests not checked at load", M, "if _digest(arrays[k]) != d:", "if False:"),
    ("transformers", "replan=\"chat\" never keeps a turn whole (the segment count not advanced)", T,
     "            self._segments += 1\n", ""),
    ("transformers", "replan=\"chat\" keeps the first prompt whole too (as \"history\")", T,
     "            self._segments = 1\n        if isinstance(layer, ReFreeKVLayer):",
     "            self._segments = 2\n        if isinstance(layer, ReFreeKVLayer):"),
    ("mlx", "replan=\"chat\" never keeps a turn whole (the segment count not advanced)", M,
     "            self._turn = self._segment_prompt + 1  # this segment, its last token included\n            self._segments += 1\n",
     "            self._turn = self._segment_prompt + 1  # this segment, its last token included\n"),
    ("mlx", "a prompt-cache list that misses layers decoded on", M,
     "if self.planner is not None and self.layer in self.planner.ready:", "if False:"),
    ("serve", "a held conversation continued when only its length fits the request", S,
     "if m < ids.shape[0] and bool((ids[:m] == held).all()) and", "if m < ids.shape[0] and"),
    ("serve", "a conversation held under its prompt's ids (an edited answer continues the old cache)", S,
     "self._caches.put(out[0, :-1], cache, self._model)", "self._caches.put(ids[0], cache, self._model)"),
    ("serve", "a continued cache left in the prompt cache under its old ids", S,
     "held, cache = self.entries.pop(best)", "held, cache = self.entries[best]"),
    ("serve", "continuous batching served (uncompressed) instead of refused", S,
     'refuse_settings({"continuous_batching": continuous_batching, "compile": compile})',
     'refuse_settings({"compile": compile})'),
]
TESTS = {"transformers": "tests/test_transformers.py", "mlx": "tests/test_mlx_lm.py",
         "serve": "tests/test_transformers_serve.py"}


def _copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv-kvpress", "results", "__pycache__")
    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("transformers", "mlx", "serve", "all"), default="all")
    p.add_argument("--only", default="", help="comma-separated mutant numbers (see --list)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    a = p.parse_args(argv)
    try:
        only = {int(x) for x in a.only.split(",") if x.strip()}
    except ValueError:
        p.error(f"--only: received {a.only!r}; expected comma-separated mutant numbers")
    if only - set(range(len(MUTANTS))):
        p.error(f"--only: received {a.only!r}; expected numbers from 0 to {len(MUTANTS) - 1}")
    chosen = [(i, m) for i, m in enumerate(MUTANTS)
              if (a.engine in ("all", m[0])) and (not only or i in only)]
    for i, (engine, name, path, old, _) in chosen:
        count = (ROOT / path).read_text().count(old)
        if count != 1:
            sys.exit(f"mutant {i} ({name}): its snippet occurs {count} times in {path}; expected once "
                     "(the adapter changed: update the mutant)")
    if a.list:
        for i, (engine, name, *_rest) in chosen:
            print(f"{i:2}  {engine:12}  {name}")
        return
    for i, (engine, name, path, old, new) in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp) / "tree"
            _copy(d)
            target = d / path
            target.write_text(target.read_text().replace(old, new))
            t0 = time.perf_counter()
            try:
                run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", TESTS[engine]],
                                     cwd=d, env={**os.environ, "PYTHONPATH": str(d)}, capture_output=True, text=True,
                                     stdin=subprocess.DEVNULL, timeout=1800)
                failed = [line for line in run.stdout.splitlines() if line.startswith("FAILED")]
                verdict = "CAUGHT" if run.returncode else "MISSED"
            except subprocess.TimeoutExpired:  # a test that hangs is not a test that catches
                failed, verdict = [], "HUNG (pytest still running after 30 min)"
            print(f"{i:2} {verdict} {engine}: {name} ({time.perf_counter() - t0:.0f} s)"
                  + (f"\n     by {failed[0].split(' - ')[0].removeprefix('FAILED ')}" if failed else ""), flush=True)


if __name__ == "__main__":
    main()
