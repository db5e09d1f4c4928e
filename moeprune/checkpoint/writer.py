"""One writer of output folders.

`OutputFolder` is the only way moeprune creates a folder of results: the work goes into a temporary
folder beside the target, which is renamed into place when everything is written. On any failure (an
exception in the work, a full disk, a failed final rename, Ctrl-C) the temporary folder is removed and
the target is left as it was. An output that is, contains, or is inside an input is refused before any
work starts, files get the permissions the user's umask gives (not the 0600 of temporary files), and
errors of the file system become one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from moeprune.errors import MoePruneError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["OutputFolder", "atomic_output_dir", "check_output_dir", "portable_path", "write_json", "os_error",
           "save_compressed", "write_checkpoint", "write_side_files", "PROVENANCE_FILE"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def os_error(exc: OSError, path: str | os.PathLike, action: str = "write") -> MoePruneError:
    """A one-line error for a file-system failure, naming the path and what would fix it."""
    hints = {errno.ENOSPC: "free some space or choose another -o",
             errno.EROFS: "the file system is read-only; choose another -o",
             errno.EACCES: "permission denied; choose a folder you can write",
             errno.EPERM: "operation not permitted; choose a folder you can write",
             errno.EBUSY: "the path is busy (a mount point?); choose a folder inside it",
             errno.ENOTDIR: "a parent of the path is a file; choose another -o",
             errno.EXDEV: "the path is a mount point; choose a folder inside it"}
    reason = exc.strerror or type(exc).__name__
    hint = hints.get(exc.errno, "check the path and try again")
    return MoePruneError(f"cannot {action} {path}: {reason} ({hint})")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output_dir(out: str | os.PathLike, *, inputs=(), overwrite: bool = False) -> Path:
    """Refuse an output folder that is an input, inside one or contains one, a file, a folder under a
    file, or not empty (unless `overwrite`). Returns the resolved path."""
    out = _resolved(out)
    for src in inputs:
        if src is None:
            continue
        src = _resolved(src)
        if out == src:
            raise MoePruneError(f"output folder {out} is the input folder {src}; choose another -o")
        if src in out.parents:
            raise MoePruneError(f"output folder {out} is inside the input folder {src}; choose a folder outside it")
        if out in src.parents:
            raise MoePruneError(f"output folder {out} contains the input folder {src}; writing there could delete it, "
                                "choose another -o")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MoePruneError(f"cannot write {out}: {parent} is a file; choose another -o")
    if out.exists():
        if not out.is_dir():
            raise MoePruneError(f"output path {out} is a file; choose a folder with -o")
        if os.path.ismount(out):
            raise MoePruneError(f"output folder {out} is a mount point; choose a folder inside it")
        if any(out.iterdir()) and not overwrite:
            raise MoePruneError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
    return out


def _fix_permissions(folder: Path) -> None:
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root) / f, 0o666 & ~mask)


class OutputFolder:
    """Context manager: `with OutputFolder(out, inputs=(src,)) as tmp:` write into `tmp`; on success the
    folder appears at `out` in one rename, on any failure nothing is left behind.

    The checks of `check_output_dir` run in the constructor, so a command can build its OutputFolder
    before hours of work and fail at once on a bad path.
    """

    def __init__(self, out: str | os.PathLike, *, inputs=(), overwrite: bool = False):
        self.inputs = tuple(i for i in inputs if i is not None)
        self.overwrite = overwrite
        self.path = check_output_dir(out, inputs=self.inputs, overwrite=overwrite)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        # checked again: the work before entering may have taken hours
        check_output_dir(self.path, inputs=self.inputs, overwrite=self.overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        except OSError as exc:
            raise os_error(exc, self.path) from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self.tmp = self.tmp, None
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, MoePruneError):
                raise os_error(exc, self.path) from None
            return False
        try:
            _fix_permissions(tmp)
            self._replace(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise os_error(exc, self.path) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return False

    def _replace(self, tmp: Path) -> None:
        out = self.path
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)  # put the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, inputs=(), overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out` (see `OutputFolder`)."""
    with OutputFolder(out, inputs=inputs, overwrite=overwrite) as tmp:
        yield tmp


def write_json(path: Path, data) -> None:
    """Strict JSON (no NaN/Infinity tokens), indented, with a final newline."""
    from moeprune import strict_json

    Path(path).write_text(strict_json.dumps(data, indent=2) + "\n")


def portable_path(path: str | os.PathLike | None, *, relative_to: str | os.PathLike | None = None) -> str | None:
    """A path fit for published files: the shipped demo as 'demo', else the folder's name (or the path
    relative to `relative_to` when it lies inside it). Never an absolute local path."""
    if path is None:
        return None
    from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR

    p = Path(path)
    if not p.is_absolute():
        return str(p)
    if p.resolve() == DEMO_MODEL_DIR:
        return "demo"
    if relative_to is not None:
        try:
            return str(p.resolve().relative_to(_resolved(relative_to)))
        except ValueError:
            pass
    return p.name


PROVENANCE_FILE = "moeprune.json"


def save_compressed(model: nn.Module, out_dir: str | Path, *, source_dir: str | Path | None = None,
                    provenance: dict | None = None, overwrite: bool = False,
                    max_shard_size: str = "5GB") -> Path:
    """Save `model` with `save_pretrained` (hub per-expert format) into `out_dir`, atomically.

    Tokenizer files and the generation config are copied from `source_dir` when present there (the
    source folder is only read). `provenance` is written as `moeprune.json` beside the weights.
    """
    with OutputFolder(out_dir, inputs=(source_dir,), overwrite=overwrite) as tmp:
        write_checkpoint(model, tmp, source_dir=source_dir, provenance=provenance, max_shard_size=max_shard_size)
    return Path(out_dir).expanduser().resolve()


def write_checkpoint(model: nn.Module, folder: Path, *, source_dir: str | Path | None = None,
                     provenance: dict | None = None, max_shard_size: str = "5GB") -> None:
    """Write weights, config, tokenizer/generation files and `moeprune.json` into an existing folder."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_side_files(source_dir, folder, provenance, replace=False)


def write_side_files(source_dir: str | Path | None, folder: Path, provenance: dict | None, *,
                     replace: bool = True) -> None:
    """Beside the weights: the source's tokenizer and generation files (`replace=False` keeps the ones
    `save_pretrained` already wrote) and `moeprune.json` with the provenance."""
    from moeprune import __version__
    from moeprune.checkpoint.model_dir import TOKENIZER_FILES

    folder = Path(folder)
    if source_dir is not None:
        src = Path(source_dir)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (src / name).is_file() and (replace or not (folder / name).exists()):
                shutil.copy2(src / name, folder / name)
    write_json(folder / PROVENANCE_FILE, {"moeprune_version": __version__, **(provenance or {})})
