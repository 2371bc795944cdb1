"""The one error type that means "bad input": the CLI turns it into exit code 2."""


class BadInput(ValueError):
    """Input that cannot be used (a spec, a file, a value); the message names the problem."""
