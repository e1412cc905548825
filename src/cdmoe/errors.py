"""User-facing errors: one line that names the problem and the fix."""

__all__ = ["CdmoeError"]


class CdmoeError(Exception):
    """A problem with the user's input; the CLI prints it on one line and exits with code 2."""
