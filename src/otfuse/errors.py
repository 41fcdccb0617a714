"""The one exception type that means "the user gave a bad input", and how a command reports it."""

from __future__ import annotations

import sys
from collections.abc import Callable


class OtfuseError(Exception):
    """A bad input: the message names the input and the fix."""


def run_main(fn: Callable[[], int]) -> int:
    """Run a command; a bad input becomes one line on stderr and exit code 2, Ctrl-C exit code 130."""
    try:
        return fn()
    except OtfuseError as exc:
        print(f"otfuse: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otfuse: interrupted", file=sys.stderr)
        return 130
