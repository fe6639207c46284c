"""One package, imported as refreekv, that imports NumPy and nothing heavier."""

import subprocess
import sys

HEAVY = ("torch", "mlx", "transformers", "mlx_lm", "hypothesis", "matplotlib", "rich")


def run(code: str) -> str:
    # cwd=/ so the repository's own folders are not on sys.path: we see the installed package.
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout


def test_import_is_light():
    out = run("import sys, refreekv; print(sorted({m.split('.')[0] for m in sys.modules}))")
    loaded = eval(out)
    assert "numpy" in loaded and not [m for m in HEAVY if m in loaded]


def test_numpy_work_stays_light():
    out = run("import sys, numpy as np, refreekv\n"
              "refreekv.plan_layer(np.ones((1, 2, 1, 4)), np.ones((1, 1, 30, 4)))\n"
              "print(sorted({m.split('.')[0] for m in sys.modules}))")
    assert not [m for m in HEAVY if m in eval(out)]


def test_no_generic_top_level_modules():
    out = run("import importlib.util as u; print([u.find_spec(n) is None for n in ('adapters', 'reference')],"
              " u.find_spec('refreekv.reference') is not None, u.find_spec('refreekv.adapters') is not None)")
    assert out.strip() == "[True, True] True True"


def test_importing_an_integration_patches_nothing():
    out = run("import transformers.models.llama.modeling_llama as m\n"
              "before = dict(vars(m.LlamaAttention))\n"
              "import refreekv.adapters.transformers\n"
              "print(dict(vars(m.LlamaAttention)) == before)")
    assert out.strip() == "True"
