import importlib.util
import os

from hypothesis import settings

import refreekv.pytest_plugin  # noqa: F401  (registers the "ci" and "thorough" profiles)

# Our own runs default to the derandomized "ci" profile; --hypothesis-profile overrides it.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tests/kvpress needs kvpress, which needs transformers < 5.3: scripts/test.sh runs it in the
# .venv-kvpress environment that scripts/install.sh makes.
collect_ignore = [] if importlib.util.find_spec("kvpress") else ["kvpress"]
