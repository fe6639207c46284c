"""pytest plugin (entry point ``pytest11``): ``--refreekv-backend`` and the target fixture.

``--refreekv-backend=numpy|torch|mlx|package.module:Backend`` picks the backend under test;
``--refreekv-dtypes=float32,bfloat16`` the input dtypes. Hypothesis profiles ``ci``
(derandomized, no deadline) and ``thorough`` are registered here; pick one with
``--hypothesis-profile``.

Installed with refreekv, this plugin loads in every pytest run of the environment, so it imports
nothing beyond pytest at load: without hypothesis (refreekv installed without the ``[test]``
extra) it adds its options and fixture and registers no profile, and other projects' test runs
are unaffected.
"""

from __future__ import annotations

import pytest


def _register_profiles() -> None:
    try:
        from hypothesis import settings
    except ImportError:  # refreekv without the [test] extra: the suite is not usable, nothing to set up
        return
    settings.register_profile("ci", derandomize=True, deadline=None, max_examples=150, print_blob=True)
    settings.register_profile("thorough", deadline=None, max_examples=1000, print_blob=True)


_register_profiles()


def pytest_addoption(parser):
    group = parser.getgroup("refreekv", "refreekv conformance suite")
    group.addoption("--refreekv-backend", default=None,
                    help="backend under test: numpy, torch, mlx, or module:attribute")
    group.addoption("--refreekv-dtypes", default=None,
                    help="comma-separated input dtypes (default: the backend's own list)")


@pytest.fixture(scope="session")
def refreekv_target(request):
    """The backend under test, from ``--refreekv-backend`` (NumPy when not given)."""
    from refreekv.backend import builtin_backend, load_backend
    from refreekv.testing.checks import Target

    name = request.config.getoption("--refreekv-backend") or "numpy"
    backend = builtin_backend(name) if name in ("numpy", "torch", "mlx") else load_backend(name)
    option = request.config.getoption("--refreekv-dtypes")
    dtypes = tuple(option.split(",")) if option else tuple(backend.dtypes)
    return Target(backend, dtypes)
