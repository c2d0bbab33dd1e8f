"""Errors that the CLI turns into one line on stderr and an exit code, never a traceback."""


class UsageError(Exception):
    """Bad input from the user (flag, YAML, model spec, name): one line, exit code 2."""

    exit_code = 2


def closest(name: str, known: list[str], n: int = 3) -> str:
    """A ' (did you mean: a, b?)' hint with the known names closest to ``name``, or ''."""
    import difflib

    hits = difflib.get_close_matches(name, known, n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(hits)}?)" if hits else ""
