"""The one exception type refreekv raises for bad input."""

from __future__ import annotations


class ReFreeKVError(ValueError):
    """Bad input to a refreekv entry point.

    The message always names the argument, what was received and what was expected, e.g.
    ``keys: received shape (1, 3, 0, 64); expected a non-empty prompt (n >= 1)``.
    """


def bad_input(argument: str, received: object, expected: str) -> ReFreeKVError:
    """Build the project's error with its fixed three-part message."""
    return ReFreeKVError(f"{argument}: received {received}; expected {expected}")
