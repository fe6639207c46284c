"""pytest plugin (entry point ``pytest11``): ``--refreekv-backend`` and the target fixture.

``--refreekv-backend=numpy|torch|mlx|package.module:Backend`` picks the backend under test;
``--refreekv-dtypes=float32,bfloat16`` the input dtypes. Hypothesis profiles ``ci``
(derandomized, no deadline) and ``thorough`` are registered here; pick one with
``--hypothesis-profile``.
"""

from __future__ import annotations

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=150, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=1000, print_blob=True)


def pytest_addoption(parser):
    group = parser.getgroup("refreekv", "refreekv conformance suite")
    group.addoption("--refreekv-backend", default=None,
                    help="backend under test: numpy, torch, mlx, or module:attribute")
    group.addoption("--refreekv-dtypes", default=None,
                    help="comma-separated input dtypes (default: the backend's own list)")


DEFAULT_DTYPES = {
    "numpy": ("float64", "float32", "float16"),
    "torch": ("float32", "float16", "bfloat16"),
    "mlx": ("float32", "float16", "bfloat16"),
}


@pytest.fixture(scope="session")
def refreekv_target(request):
    """The backend under test, from ``--refreekv-backend`` (NumPy when not given)."""
    from refreekv.backend import builtin_backend, load_backend

    from refreekv.testing.checks import Target

    name = request.config.getoption("--refreekv-backend") or "numpy"
    backend = builtin_backend(name) if name in DEFAULT_DTYPES else load_backend(name)
    option = request.config.getoption("--refreekv-dtypes")
    dtypes = tuple(option.split(",")) if option else getattr(backend, "dtypes", None) or \
        DEFAULT_DTYPES.get(name, ("float32",))
    return Target(backend, tuple(dtypes))
