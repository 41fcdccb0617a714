"""The one exception type that means "the user gave a bad input"; the CLI prints it on one line and exits 2."""


class OtfuseError(Exception):
    """A bad input: the message names the input and the fix."""
