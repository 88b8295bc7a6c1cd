"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""


class UserError(Exception):
    """A mistake in the user's input or environment; the message names the problem and the fix."""
