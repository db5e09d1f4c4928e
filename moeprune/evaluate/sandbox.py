"""Run model-written Python in a separate, restricted process.

The evaluating process never executes generated code. Each program runs in a fresh interpreter
(``python -I -B``) with:

- a wall-clock timeout; on expiry the child's whole process group is killed (SIGKILL);
- ``RLIMIT_AS`` (address space), ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_FSIZE`` (largest file),
  ``RLIMIT_CORE`` = 0, set inside the child before the program starts;
- a fresh temporary working directory, removed afterwards, and a scrubbed environment;
- a network namespace without interfaces (``unshare -n``) when the machine allows it;
- an audit hook (``sys.addaudithook``) that refuses sockets and DNS, opening files for writing
  outside the working directory, deleting/renaming/linking/chmod outside it, starting processes
  (``subprocess``, ``os.system``, ``exec*``, ``fork``, ``posix_spawn``), signalling other
  processes, ``ctypes`` and inspection hooks that could reach the audit hook itself.

This is a guard against accidents by ordinary generated code, not a security boundary: see
``docs/evaluation.md`` for what it does not stop. Run untrusted code inside a container or VM.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["SandboxResult", "run_python", "network_isolation_prefix"]

_LOG_TAIL = 2000

# The child's preamble. Placeholders are filled with repr() literals by `_preamble`.
_PREAMBLE = r'''
import os, sys, resource
_ROOT = os.path.realpath(os.getcwd())
for _lim, _val in ((resource.RLIMIT_AS, __MEM__), (resource.RLIMIT_CPU, __CPU__),
                   (resource.RLIMIT_FSIZE, __FSIZE__), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(_lim, (_val, _val))
with open("program.py", encoding="utf-8") as _f:
    _SOURCE = _f.read()

def _make_hook(root=_ROOT, sep=os.sep, realpath=os.path.realpath, fsdecode=os.fsdecode):
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = frozenset((
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "os.symlink", "os.link",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "os.chroot", "os.setuid", "os.setgid",
    ))
    path_events = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
                   "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                   "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                   "shutil.move": (0, 1), "os.chflags": (0,), "os.lchmod": (0,)}

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor; its opening was checked
        full = realpath(fsdecode(path))
        return full == root or full.startswith(root + sep)

    def hook(event, args):
        if event in blocked:
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and path is not None and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory: %r" % (path,))
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError("sandbox: %s outside the working directory" % event)
        elif event == "object.__setattr__" and type(args[0]).__name__ == "function":
            raise PermissionError("sandbox: changing function objects is not allowed")
    return hook

sys.addaudithook(_make_hook())
del _make_hook, _f, _lim, _val, resource
exec(compile(_SOURCE, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``passed`` (exit code 0), ``failed`` (an exception or non-zero exit; ``detail``
    holds the last line of stderr), ``timeout`` (killed after the wall limit) or ``killed``
    (ended by a signal such as SIGXCPU or SIGKILL from a resource limit).
    """

    status: Literal["passed", "failed", "timeout", "killed"]
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _preamble(*, memory_mb: int, cpu_seconds: int, max_file_mb: int) -> str:
    return (_PREAMBLE.replace("__MEM__", repr(memory_mb * 1024 * 1024))
            .replace("__CPU__", repr(cpu_seconds))
            .replace("__FSIZE__", repr(max_file_mb * 1024 * 1024)))


@functools.lru_cache(maxsize=1)
def network_isolation_prefix() -> tuple[str, ...]:
    """``("unshare", "-n")`` (or ``-rn``) if this machine lets us create a network namespace, else ``()``."""
    exe = shutil.which("unshare")
    if exe is None or not sys.platform.startswith("linux"):
        return ()
    for flags in ("-n", "-rn"):
        try:
            done = subprocess.run([exe, flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return (exe, flags)
    return ()


def _scrubbed_env(work: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _last_line(path: Path) -> str:
    text = path.read_bytes()[-_LOG_TAIL:].decode("utf-8", errors="replace").strip()
    return text.splitlines()[-1] if text else ""


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
               isolate_network: bool = True) -> SandboxResult:
    """Run ``program`` (Python source) in a restricted child process and report how it ended.

    Args:
        program: the full source, e.g. ``prompt + completion + test + "check(entry_point)"``.
        timeout: wall-clock seconds before the process group is killed; the CPU limit is
            ``ceil(timeout) + 1`` seconds.
        memory_mb: address-space cap (``RLIMIT_AS``) for the child interpreter.
        max_file_mb: largest file the child may write (``RLIMIT_FSIZE``).
        isolate_network: also run under ``unshare -n`` when available.
    """
    root = Path(tempfile.mkdtemp(prefix="moeprune-exec-"))
    work = root / "work"
    work.mkdir()
    try:
        (work / "program.py").write_text(program, encoding="utf-8")
        (root / "preamble.py").write_text(
            _preamble(memory_mb=memory_mb, cpu_seconds=int(timeout) + 1, max_file_mb=max_file_mb),
            encoding="utf-8")
        prefix = network_isolation_prefix() if isolate_network else ()
        cmd = [*prefix, sys.executable, "-I", "-B", str(root / "preamble.py")]
        log = root / "output.log"
        start = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, cwd=work, env=_scrubbed_env(work), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)  # the child is not reaped yet, so its group id is still its own
                return SandboxResult("timeout", f"killed after {timeout:g}s", time.monotonic() - start)
        seconds = time.monotonic() - start
        if code == 0:
            return SandboxResult("passed", "", seconds)
        if code < 0:
            return SandboxResult("killed", f"signal {signal.Signals(-code).name}", seconds)
        return SandboxResult("failed", _last_line(log) or f"exit code {code}", seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
