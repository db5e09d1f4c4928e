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
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from moeprune.errors import MoePruneError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["OutputFolder", "atomic_output_dir", "remove_stale", "write_file_atomically",
           "check_output_file", "check_output_dir", "portable_path", "write_json", "os_error",
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


# What moeprune writes into an output folder (model, observations, run report, model card); `--overwrite`
# replaces only a folder that holds nothing else, so it never deletes a file moeprune did not write.
_OWN_FILES = frozenset(("config.json", "generation_config.json", "moeprune.json", "report.json", "report.md",
                        "README.md", "observations.json", "observations.safetensors", "model.safetensors.index.json",
                        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                        "chat_template.jinja", "chat_template.json"))
_OWN_PATTERNS = (re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors"), re.compile(r"plots/[\w.-]+\.png"),
                 re.compile(r"observations/observations\.(json|safetensors)"))


def _foreign_file(folder: Path) -> Path | None:
    """The first file (or link, or special file) under `folder` that moeprune does not write, if any."""
    for root, dirs, files in os.walk(folder):
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(root, d))):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink() or not path.is_file():
                return path
            if rel not in _OWN_FILES and not any(pat.fullmatch(rel) for pat in _OWN_PATTERNS):
                return path
    return None


def check_output_dir(out: str | os.PathLike, *, inputs=(), overwrite: bool = False) -> Path:
    """Refuse an output folder that is an input, inside an input folder or holds an input (file or folder),
    a file, a folder under a file, or not empty (unless `overwrite`, and then only when everything in it
    is something moeprune writes). Returns the resolved path."""
    out = _resolved(out)
    for src in inputs:
        if src is None:
            continue
        src = _resolved(src)
        what = "input folder" if src.is_dir() else "input file"
        if out == src:
            raise MoePruneError(f"output {out} is the {what} {src}; choose another -o")
        if src in out.parents:
            raise MoePruneError(f"output folder {out} is inside the {what} {src}; choose a folder outside it")
        if out in src.parents:
            raise MoePruneError(f"output folder {out} contains the {what} {src}; writing there could delete it, "
                                "choose another -o")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise MoePruneError(f"cannot write {out}: {parent} is a file; choose another -o")
    if out.is_symlink():
        raise MoePruneError(f"output path {out} is a symbolic link; choose a real folder with -o")
    if out.exists():
        if not out.is_dir():
            raise MoePruneError(f"output path {out} is a file; choose a folder with -o")
        if os.path.ismount(out):
            raise MoePruneError(f"output folder {out} is a mount point; choose a folder inside it")
        if any(out.iterdir()):
            if not overwrite:
                raise MoePruneError(f"output folder {out} is not empty; choose a new folder or pass --overwrite")
            foreign = _foreign_file(out)
            if foreign is not None:
                raise MoePruneError(f"output folder {out} holds {foreign.relative_to(out)}, which moeprune did not "
                                    "write; --overwrite replaces only moeprune's own outputs, so move it or choose "
                                    "another -o")
    return out


def _fix_permissions(folder: Path) -> None:
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
        for f in files:
            os.chmod(Path(root) / f, 0o666 & ~mask)


_TMP_MARK, _OLD_MARK = ".tmp-", ".old-"


def _lock(folder: Path) -> int | None:
    """An exclusive, non-blocking lock on `folder` held through the returned descriptor (None: another
    process holds it). The kernel drops it when the process ends, however it ends."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove what an interrupted run into `parent/name` left beside it: temporary folders no live process
    holds (each run locks its own), and a previous output set aside during a replacement by a process
    that is gone (put back when the replacement never finished). Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(f".{name}{_TMP_MARK}") and entry.is_dir() and not entry.is_symlink():
            fd = _lock(entry)
            if fd is None:
                continue  # a live run is writing there
            try:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            finally:
                os.close(fd)
        elif entry.name.startswith(f".{name}{_OLD_MARK}") and entry.is_dir() and not entry.is_symlink():
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue
            target = parent / name
            if target.exists():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
            else:
                os.rename(entry, target)  # the replacement was cut between its two renames
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_space(exc: BaseException) -> bool:
    """A write that failed for lack of space, whichever library raised it (safetensors and torch wrap the
    OS error in their own exception types)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return "No space left on device" in text or "[Errno 28]" in text


class OutputFolder:
    """Context manager: `with OutputFolder(out, inputs=(src,)) as tmp:` write into `tmp`; on success the
    folder appears at `out` in one rename, on any failure (an exception, Ctrl-C, SIGTERM through the CLI)
    nothing is left behind; a run killed outright (SIGKILL, power loss) leaves only a hidden, locked-free
    `.<name>.tmp-*` folder, which the next run into the same parent removes.

    The checks of `check_output_dir` run in the constructor, so a command can build its OutputFolder
    before hours of work and fail at once on a bad path. `inputs` are every file and folder the command
    reads (model, keep file, observations, recipe, calibration and task files); `add_inputs` adds the
    ones known later.
    """

    def __init__(self, out: str | os.PathLike, *, inputs=(), overwrite: bool = False):
        self.inputs = tuple(i for i in inputs if i is not None)
        self.overwrite = overwrite
        self.path = check_output_dir(out, inputs=self.inputs, overwrite=overwrite)
        self.tmp: Path | None = None
        self._fd: int | None = None

    def add_inputs(self, *paths) -> None:
        self.inputs += tuple(p for p in paths if p is not None)
        check_output_dir(self.path, inputs=self.inputs, overwrite=self.overwrite)

    def __enter__(self) -> Path:
        # checked again: the work before entering may have taken hours
        check_output_dir(self.path, inputs=self.inputs, overwrite=self.overwrite)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.path.parent, self.path.name)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}{_TMP_MARK}", dir=self.path.parent))
        except OSError as exc:
            raise os_error(exc, self.path) from None
        self._fd = _lock(self.tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        tmp, self.tmp = self.tmp, None
        try:
            if exc_type is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError) and not isinstance(exc, MoePruneError):
                    raise os_error(exc, self.path) from None
                if _no_space(exc):
                    raise os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.path) from None
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
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _replace(self, tmp: Path) -> None:
        out = self.path
        old = None
        if out.exists():
            check_output_dir(out, inputs=self.inputs, overwrite=self.overwrite)  # nothing foreign crept in
            old = out.parent / f".{out.name}{_OLD_MARK}{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)  # put the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _is_own_report(path: Path) -> bool:
    """A JSON report moeprune wrote (it always records `moeprune_version`)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "moeprune_version" in data


def check_output_file(path: str | os.PathLike, *, inputs=(), overwrite: bool = False, option: str = "-o") -> Path:
    """Refuse a report path that is a folder, a link, under a file or an unwritable folder, an input or inside
    an input folder, or an existing file (unless `overwrite`, and then only a report moeprune wrote)."""
    raw = Path(path).expanduser()
    if raw.is_symlink():
        raise MoePruneError(f"{option} {raw} is a symbolic link; pass a plain file name")
    path = _resolved(raw)
    if path.is_dir():
        raise MoePruneError(f"{option} {path} is a folder; pass a file name such as {path / 'report.json'}")
    for src in inputs:
        if src is None:
            continue
        src = _resolved(src)
        if path == src:
            raise MoePruneError(f"{option} {path} is an input of this command; choose another report path")
        if src in path.parents:
            raise MoePruneError(f"{option} {path} is inside the input folder {src}; choose a path outside it")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise MoePruneError(f"{option} {path}: {parent} is a file, not a folder; choose another report path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoePruneError(f"{option} {path}: folder {parent} is not writable; choose another report path")
    if path.exists():
        if not overwrite:
            raise MoePruneError(f"{option} {path} exists; choose a new file name or pass --overwrite")
        if not path.is_file() or not _is_own_report(path):
            raise MoePruneError(f"{option} {path} exists and is not a report moeprune wrote; --overwrite replaces "
                                "only moeprune's own reports, so choose another path")
    return path


def write_file_atomically(path: str | os.PathLike, text: str, *, inputs=(), overwrite: bool = False,
                          option: str = "-o") -> Path:
    """Write `text` to `path` through a temporary file beside it and one rename: readers never see half a
    file, and a failure (a full disk included) leaves the old file, if any, as it was."""
    path = check_output_file(path, inputs=inputs, overwrite=overwrite, option=option)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise os_error(exc, path) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
