"""docs/kvpress.md's runnable blocks, in the kvpress environment (tests/test_docs.py runs the rest)."""

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("docs_blocks", Path(__file__).resolve().parents[1] / "test_docs.py")
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)

pytestmark = pytest.mark.model


@pytest.mark.parametrize("code", docs.blocks("python", kvpress=True))
def test_kvpress_block_runs(code, tmp_path):
    docs.test_python_block_runs(code, tmp_path)
