"""The public API: `from otfuse import ...` and the usage example in the package docstring, run as a doctest."""

import doctest

import otfuse


def test_the_package_docstring_runs():
    failures, tried = doctest.testmod(otfuse, verbose=False)
    assert tried > 5 and failures == 0


def test_the_public_names_resolve():
    for name in otfuse.__all__:
        assert getattr(otfuse, name) is not None
