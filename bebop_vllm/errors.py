"""User-facing errors: the CLI prints their message on one line instead of a traceback."""


class BebopError(Exception):
    """A problem the user can fix; the message says what failed and what to do."""
