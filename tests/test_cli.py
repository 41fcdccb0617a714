"""The command line: every subcommand documents each option from its config's field comment."""

import pytest

from otfuse.cli import main


@pytest.mark.parametrize("command", ["train", "evaluate", "fuse"])
def test_help_lists_the_options_with_their_meaning(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text wraps with the terminal
    assert exc.value.code == 0 and "usage: otfuse" in out
    if command == "train":
        assert "peak learning rate (default: 0.2)" in out
    if command == "fuse":
        assert "activation | weight | weight-matching (default: activation)" in out
