"""The `otfuse` console command's entry point.

It imports the command-line module inside `main` on purpose: that import loads PyTorch, which
takes seconds, and a Ctrl-C during it must end in one line, not a traceback.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        os.getcwd()
    except FileNotFoundError:  # every relative path would resolve against a folder that is gone
        print(
            "otfuse: error: the current folder no longer exists (deleted while this shell was in it); cd to an existing folder",
            file=sys.stderr,
        )
        return 2
    try:
        from otfuse import cli  # heavy (PyTorch): imported here so that Ctrl-C during start-up is one line
    except KeyboardInterrupt:
        print("otfuse: interrupted", file=sys.stderr)
        return 130
    return cli.main(argv)
