"""User-facing errors: one line that names the problem and the fix."""

__all__ = ["CdmoeError"]


class CdmoeError(ValueError):
    """A problem with the user's input (a command's option, a Python API argument, a file): one message naming
    the problem and the fix. The CLI prints it on one line and exits with code 2."""
