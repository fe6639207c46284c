import os

from hypothesis import settings

import refreekv.pytest_plugin  # noqa: F401  (registers the "ci" and "thorough" profiles)

# Our own runs default to the derandomized "ci" profile; --hypothesis-profile overrides it.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
