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
              "refreekv.plan_layer(np.ones((1, 2, 1, 4)), np.ones((1, 1, 30, 4)), refreekv.ReFreeKVConfig.paper())\n"
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


def test_the_pytest_plugin_is_harmless_without_the_test_extra(tmp_path):
    """refreekv installed without hypothesis: another project's pytest run still works, and the
    plugin's options are there. The environment is built by hand (python -S, links to pytest and
    its dependencies, NumPy, refreekv and an entry-point record), so nothing is downloaded."""
    import importlib.util
    import os
    from pathlib import Path

    import refreekv

    site = tmp_path / "site"
    site.mkdir()
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    needs = [r.name.lower() for r in map(Requirement, requires("pytest") or [])
             if r.marker is None or r.marker.evaluate({"extra": ""})]  # pytest's own dependencies
    for name in ["pytest", "_pytest", "numpy", "py", *needs]:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        src = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin)
        (site / src.name).symlink_to(src)
    numpy_libs = Path(importlib.util.find_spec("numpy").origin).parent.parent / "numpy.libs"
    if numpy_libs.exists():
        (site / "numpy.libs").symlink_to(numpy_libs)
    (site / "refreekv").symlink_to(Path(refreekv.__file__).parent)
    dist = site / "refreekv-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: refreekv\nVersion: 0.0.0\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nrefreekv = refreekv.pytest_plugin\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_other.py").write_text("def test_other():\n    assert 1 + 1 == 2\n")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    check = subprocess.run([sys.executable, "-S", "-c", "import hypothesis"], cwd=project, env=env,
                           capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'hypothesis'" in check.stderr
    run = subprocess.run([sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=project,
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    helped = subprocess.run([sys.executable, "-S", "-m", "pytest", "--help"], cwd=project, env=env,
                            capture_output=True, text=True)
    assert "--refreekv-backend" in helped.stdout  # the plugin loaded, and did nothing else
