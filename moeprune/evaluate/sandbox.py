"""Run model-written Python in a separate, restricted process.

The evaluating process never executes generated code. Each program runs in a fresh interpreter
(``python -I -B``, the script ``sandbox_child.py``) with:

- a pass only when the child writes back a random nonce after the whole program, tests included,
  has returned (exit status 0 alone is not enough);
- user, PID, mount and network namespaces where the machine allows them (``sandbox_os``), so the
  program cannot signal the evaluator and every process it started dies with the run;
- a process limit (``RLIMIT_NPROC`` in the user namespace, or a ``pids`` cgroup as root);
- a wall-clock timeout (SIGKILL to the whole tree), ``RLIMIT_AS``, ``RLIMIT_CPU``,
  ``RLIMIT_FSIZE``, no core files, and ``setpriv --pdeathsig`` plus a lifeline pipe so it dies
  with the evaluator;
- a fresh temporary working directory, always removed, and a scrubbed environment;
- an audit hook (``sandbox_child.py``) refusing sockets, writes outside the working directory,
  process creation, signals and ``ctypes``.

``docs/evaluation.md`` lists what this guarantees, what it does not, and what was measured.
Run untrusted code inside a container or VM.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moeprune.evaluate.sandbox_os import PidsCgroup, isolation, kill_tree, process_limit, remove_tree

__all__ = ["SandboxResult", "run_python", "isolation"]

_LOG_TAIL = 2000
_CHILD = Path(__file__).with_name("sandbox_child.py")
_NO_MARKER = "exited before its tests finished (no completion marker)"


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status`` is ``passed`` (exit code 0 and the completion marker, which the child writes only
    after the whole program, tests included, has returned), ``failed`` (an exception, a non-zero
    exit, or exit 0 without the marker; ``detail`` holds the last line of stderr), ``timeout``
    (killed after the wall limit) or ``killed`` (ended by a signal such as SIGKILL from a
    resource limit).
    """

    status: Literal["passed", "failed", "timeout", "killed"]
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


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


def _last_line(path: Path) -> str:
    text = path.read_bytes()[-_LOG_TAIL:].decode("utf-8", errors="replace").strip()
    return text.splitlines()[-1] if text else ""


def _read_marker(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 256)
    except BlockingIOError:
        return b""


def _verdict(code: int, marker: bytes, nonce: bytes, log: Path, seconds: float) -> SandboxResult:
    if code < 0:
        return SandboxResult("killed", f"signal {signal.Signals(-code).name}", seconds)
    if code != 0:
        return SandboxResult("failed", _last_line(log) or f"exit code {code}", seconds)
    if marker != nonce:
        return SandboxResult("failed", _NO_MARKER, seconds)
    return SandboxResult("passed", "", seconds)


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
               max_processes: int = 32, isolate_network: bool = True) -> SandboxResult:
    """Run ``program`` (Python source) in a restricted child process and report how it ended.

    Args:
        program: the full source, e.g. ``prompt + completion + test + "check(entry_point)"``.
        timeout: wall-clock seconds before the child's whole tree is killed; the CPU limit is
            ``ceil(timeout) + 1`` seconds.
        memory_mb: address-space cap (``RLIMIT_AS``) for the child interpreter.
        max_file_mb: largest file the child may write (``RLIMIT_FSIZE``).
        max_processes: processes and threads the child's tree may hold at once (``RLIMIT_NPROC``
            in a user namespace, or a ``pids`` cgroup when running as root).
        isolate_network: also run in a network namespace without interfaces when available.
    """
    iso = isolation(isolate_network)
    root = Path(tempfile.mkdtemp(prefix="moeprune-exec-"))
    cgroup = PidsCgroup(max_processes)
    try:
        work = root / "work"
        work.mkdir()
        (work / "program.py").write_text(program, encoding="utf-8")
        config = {"memory": memory_mb * 2**20, "cpu": int(timeout) + 1, "fsize": max_file_mb * 2**20,
                  "nproc": process_limit(iso, max_processes)}
        prefix = (*cgroup.prefix, *iso.prefix)
        return _launch(prefix, config, work, root / "output.log", timeout, iso.pid_namespace)
    finally:
        cgroup.kill_all()
        remove_tree(root)


def _launch(prefix: tuple[str, ...], config: dict, work: Path, log: Path, timeout: float,
            pid_namespace: bool) -> SandboxResult:
    nonce = secrets.token_hex(32).encode()
    done_r, done_w = os.pipe()
    life_r, life_w = os.pipe()  # the child exits when life_w closes: when this process dies
    try:
        nonce_r, nonce_w = os.pipe()
        try:
            os.write(nonce_w, nonce)
            config = {**config, "nonce_fd": nonce_r, "done_fd": done_w, "lifeline_fd": life_r}
            cmd = [*prefix, sys.executable, "-I", "-B", str(_CHILD), json.dumps(config)]
            start = time.monotonic()
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, cwd=work, env=_scrubbed_env(work), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        pass_fds=(nonce_r, done_w, life_r))
        finally:
            for fd in (nonce_r, nonce_w, done_w, life_r):  # only the child holds these ends now
                os.close(fd)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            return SandboxResult("timeout", f"killed after {timeout:g}s", time.monotonic() - start)
        finally:
            if not pid_namespace:
                kill_tree(proc)  # what is left in the group; a PID namespace has already ended
        return _verdict(code, _read_marker(done_r), nonce, log, time.monotonic() - start)
    finally:
        os.close(done_r)
        os.close(life_w)
