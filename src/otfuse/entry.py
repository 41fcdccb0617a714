"""The `otfuse` console command's entry point.

It imports the command-line module inside `main` on purpose: that import loads PyTorch, which
takes seconds, and a Ctrl-C during it must end in one line, not a traceback.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from otfuse import cli  # heavy (PyTorch): imported here so that Ctrl-C during start-up is one line
    except KeyboardInterrupt:
        print("otfuse: interrupted", file=sys.stderr)
        return 130
    return cli.main(argv)
