import importlib.util
import os

from hypothesis import settings

import refreekv.pytest_plugin  # noqa: F401  (registers the "ci" and "thorough" profiles)

# Our own runs default to the derandomized "ci" profile; --hypothesis-profile overrides it.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/with_kvpress needs kvpress, which needs transformers < 5.3: scripts/test.sh runs it in the
# .venv-kvpress environment that scripts/install.sh makes.
def _has_kvpress() -> bool:
    # find_spec("kvpress") alone is fooled by any directory named kvpress on sys.path (a namespace
    # package); the real one has kvpress.presses.
    try:
        return importlib.util.find_spec("kvpress.presses") is not None
    except ModuleNotFoundError:
        return False


collect_ignore = [] if _has_kvpress() else ["with_kvpress"]
