"""A fourth backend, written by following docs/conformance.md: the Python array API standard,
here on ``array_api_strict`` (a strict reference implementation of the standard).

Run the conformance suite against it:

    pytest --pyargs refreekv.testing.suite \
        --refreekv-backend=docs.examples.array_api_backend:ArrayAPIBackend --refreekv-dtypes=float32,float64

(from the repository root, so that ``docs.examples`` is importable).
"""

from __future__ import annotations

import array_api_strict
from array_api_strict._array_object import Array

import refreekv


class ArrayAPIBackend(refreekv.ArrayAPIBackend):
    name = "array-api-strict"
    framework = "array_api_strict"   # dispatch looks at it only once it is imported
    xp = array_api_strict            # every primitive comes from the standard's names on it
    dtypes = ("float32", "float64")  # the standard has no float16 or bfloat16

    def is_appropriate(self, x) -> bool:
        return isinstance(x, Array)
