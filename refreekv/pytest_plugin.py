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


def _target(config):
    """The backend under test and its dtypes from the two options; pytest.UsageError (one message,
    before any test runs) when either names something that does not work."""
    import numpy as np

    from refreekv.backend import FLOAT_DTYPES, builtin_backend, load_backend
    from refreekv.errors import ReFreeKVError
    from refreekv.testing.checks import Target

    name = config.getoption("--refreekv-backend") or "numpy"
    try:
        backend = builtin_backend(name) if name in ("numpy", "torch", "mlx") else load_backend(name)
    except ReFreeKVError as err:
        raise pytest.UsageError(f"--refreekv-backend={name}: {err}") from err
    option = config.getoption("--refreekv-dtypes")
    dtypes = tuple(d.strip() for d in option.split(",") if d.strip()) if option is not None else tuple(backend.dtypes)
    unknown = [d for d in dtypes if d not in FLOAT_DTYPES]
    if not dtypes or unknown:
        raise pytest.UsageError(f"--refreekv-dtypes={option}: received {', '.join(map(repr, unknown)) or 'no dtype'}; "
                                f"expected a comma-separated list of {', '.join(FLOAT_DTYPES)}")
    for d in dtypes:  # a dtype the backend cannot make fails here, once, not in every check
        try:
            backend.from_numpy(np.zeros(2), d)
        except Exception as err:
            raise pytest.UsageError(f"--refreekv-dtypes={option}: backend {backend.name} cannot make a {d} array "
                                    f"({type(err).__name__}: {err}); expected dtypes it supports") from err
    return Target(backend, dtypes)


def pytest_configure(config):
    """Check the options as the run starts, only when one was given (other projects' runs: nothing)."""
    if config.getoption("--refreekv-backend", None) is not None or config.getoption("--refreekv-dtypes", None) is not None:
        config._refreekv_target = _target(config)


@pytest.fixture(scope="session")
def refreekv_target(request):
    """The backend under test, from ``--refreekv-backend`` (NumPy when not given)."""
    target = getattr(request.config, "_refreekv_target", None)
    return target if target is not None else _target(request.config)
