"""The one exception type that means "the user gave a bad input", and how a command reports it."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable


class OtfuseError(Exception):
    """A bad input: the message names the input and the fix."""


# control characters a terminal acts on (C0 but tab and newline, DEL, C1) and bidirectional overrides that reorder
# what is shown: text from a file or checkpoint metadata could move the cursor, erase a line or fake a result
_CONTROLS = [c for c in range(0x20) if chr(c) not in "\t\n"] + list(range(0x7F, 0xA0)) + [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
# a file name's bytes that are not UTF-8 (Python holds them as lone surrogates, which no terminal encoding can write)
_ESCAPES.update({0xDC80 + b: f"\\x{0x80 + b:02x}" for b in range(0x80)})


def printable(text: str) -> str:
    """`text` with every character a terminal would act on written as an escape (`\\x1b`): safe to show."""
    return text.translate(_ESCAPES)


class _PipeSafe:
    """stdout that outlives its reader and shows only text: once the pipe it writes to closes (`otfuse fuse ... |
    head`), what follows is dropped, and the command goes on to save its results instead of dying of a BrokenPipeError
    halfway; control characters (from a file name or checkpoint metadata) are written as escapes."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            self._stream.write(printable(text))
            return len(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def _closed(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's own last flush must not fail either
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _show(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr, like an error: otfuse's own say what to do, others name where they come from."""
    where = "" if "/otfuse/" in filename else f" ({filename.rpartition('/')[2]}:{lineno})"
    print(printable(f"otfuse: warning: {' '.join(str(message).split())}{where}"), file=file or sys.stderr)


def run_main(fn: Callable[[], int], verbose: bool = False) -> int:
    """Run a command; a bad input becomes one line on stderr and exit code 2, Ctrl-C exit code 130. A closed stdout
    (the reader of a pipe gone) drops the rest of the output, never the command's work. Other libraries' warnings
    (PyTorch's, POT's, optuna's) are shown only with `verbose`: otfuse says what matters in its own lines."""
    stdout = sys.stdout
    sys.stdout = stdout if isinstance(stdout, _PipeSafe) else _PipeSafe(stdout)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show  # restored with the filters when the block ends
            if not verbose:
                warnings.simplefilter("ignore")
                warnings.filterwarnings("default", module="otfuse")
            return fn()
    except OtfuseError as exc:
        print(printable(f"otfuse: error: {' '.join(str(exc).split())}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otfuse: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout = stdout
