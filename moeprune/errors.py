"""User-facing errors: one line that names the field or file and what would fix it."""

__all__ = ["MoePruneError"]


class MoePruneError(Exception):
    """An error caused by the user's input; the CLI prints it as a single line, without a traceback."""
