"""Reading user-given text files: a missing file, a folder or bytes that are not UTF-8 become one
:class:`~moeprune.errors.MoePruneError` line naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

from moeprune.errors import MoePruneError

__all__ = ["check_file", "not_utf8", "read_text"]


def check_file(path: str | Path, *, what: str) -> Path:
    """``path`` as a Path if it is an existing file; otherwise an error saying what it is instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoePruneError(f"{what} {path} is a folder, not a file; pass the file inside it")
    if not path.exists():
        raise MoePruneError(f"{what} {path} does not exist")
    return path


def not_utf8(path: str | Path, exc: UnicodeDecodeError, *, what: str) -> MoePruneError:
    """The error for a file that is not UTF-8 text (to raise ``from None``)."""
    return MoePruneError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         "save it as UTF-8")


def read_text(path: str | Path, *, what: str) -> str:
    """The file's text, read as UTF-8, with one-line errors for every way that can fail."""
    path = check_file(path, what=what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, what=what) from None
    except OSError as exc:
        raise MoePruneError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
