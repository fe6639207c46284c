"""Every code block in README.md and docs/*.md runs as written, or says it is an excerpt.

- ```python blocks run, each in a fresh interpreter from a scratch folder, unless the line before
  the fence is ``<!-- excerpt -->``.
- ```bash blocks are command lines: each ``refreekv ...`` line must parse with the CLI's own
  parser and each ``pytest``/script line must name files that exist (running them takes from
  minutes to an hour; CI runs the README's two commands itself).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```(?P<lang>[a-z]*)\n(?P<body>.*?)\n```", re.S)


def blocks(lang: str, kvpress: bool = False):
    """Runnable blocks of ``lang``; blocks that import kvpress run in the kvpress environment
    (tests/with_kvpress/test_docs_kvpress.py), the others here."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] != lang or m["before"].strip() == "<!-- excerpt -->":
                continue
            if lang == "python" and ("import kvpress" in m["body"]) != kvpress:
                continue
            line = text[:m.start("body")].count("\n") + 1
            out.append(pytest.param(m["body"], id=f"{page.relative_to(ROOT)}:{line}"))
    return out


@pytest.mark.model
@pytest.mark.parametrize("code", blocks("python"))
def test_python_block_runs(code, tmp_path):
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.parametrize("code", blocks("bash"))
def test_bash_block_is_well_formed(code):
    from refreekv.cli import parser

    joined = re.sub(r"\\\n\s*", " ", code)
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\|?|;", line):  # and each side of a pipe
            words = shlex.split(part)
            if not words:
                continue
            if words[0] == "refreekv":
                parser().parse_args(words[1:])  # SystemExit on an unknown option or a bad value
            elif words[0].startswith(("./", "scripts/", "bash")):
                script = words[1] if words[0] == "bash" else words[0]
                assert (ROOT / script).exists(), script
            elif words[:3] == ["python3", "-m", "pytest"] or words[0] == "pytest":
                for w in words:
                    if w.startswith("tests/") or w.endswith(".py"):
                        assert (ROOT / w.split("::")[0]).exists(), w


def test_some_blocks_are_checked():
    assert len(blocks("python")) >= 4 and len(blocks("bash")) >= 3
