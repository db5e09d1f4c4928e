"""Run model-written Python in separate, confined processes; the verdict comes from outside them.

Two entry points:

- :func:`run_tests` (used by the ``code_exec`` scorer) runs a code task as two processes, each
  in its own sandbox: the *program* process runs only ``prompt + completion`` and then answers
  calls to its functions over a pipe; the *test* process runs the task's tests with the entry
  point (and any function the program defines that the prompt does not) bound to proxies that
  forward each call to the program. Values cross only as Python literals. The test process
  writes a random nonce, which the parent gave it over a pipe, only after ``check`` returned. The
  program never sees the tests, the reference or the nonce, and cannot reach the test process
  (separate PID, mount, network and IPC-free namespaces), so nothing it does to itself, its
  frames or its builtins can turn a wrong answer into a pass.
- :func:`run_python` runs one plain program; it passes when it exits with status 0.

Every sandboxed process runs with the kernel's limits (see ``sandbox_os`` and
``sandbox_child``): a read-only root file system that holds only system folders and the
interpreter (no site-packages for the program, no home, no repository, no task data), a
size-limited tmpfs as its only writable folder, uid 65534 and no capabilities, no network
interfaces, its own PID namespace, ``RLIMIT_AS``/``CPU``/``FSIZE``/``NOFILE``/``CORE``, and as
root a memory and a pids cgroup. Where that confinement cannot be set up, both functions return
``SandboxResult("refused", reason)`` and run nothing. An audit hook stays in the program as a
second line; the verdict and the containment do not rely on it.

``docs/evaluation.md`` lists what this guarantees, what it does not, and what was measured.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moeprune.evaluate import sandbox_os
from moeprune.evaluate.sandbox_os import (Cgroups, isolation, kill_tree, process_limit, read_available, remove_tree,
                                          setup_config)

__all__ = ["SandboxResult", "run_python", "run_tests", "isolation"]

_LOG_TAIL = 4000
_CHILD = sandbox_os.CHILD
_AUDIT_HOOK = True  # defence in depth; tests switch it off to show the kernel's limits hold alone
_NO_MARKER = "the tests did not finish (no completion marker)"


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``passed``; ``failed`` (an exception, a non-zero exit, or for :func:`run_tests`
    no completion marker; ``detail`` holds the last line of stderr); ``timeout`` (killed after the
    wall limit); ``killed`` (ended by a signal, e.g. SIGKILL from the memory cgroup); ``refused``
    (this machine cannot confine the code, nothing ran; ``detail`` says why). ``output`` is the
    tail of what the program wrote (stdout and stderr together).
    """

    status: Literal["passed", "failed", "timeout", "killed", "refused"]
    detail: str
    seconds: float
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - _LOG_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def _writer(fd: int, data: bytes) -> None:
    """Write ``data`` to a pipe from a thread (the reader may be slow, or dead), then close it."""
    def write() -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            pass
        finally:
            os.close(fd)
    threading.Thread(target=write, daemon=True).start()


class _Sandboxed:
    """One confined process: its cgroups, its folder, its log and its launcher."""

    def __init__(self, role: str, root: Path, iso, limits: dict, *, memory: int, max_processes: int,
                 disk: int, fds: dict, audit_hook: bool) -> None:
        self.cgroups = Cgroups(memory, max_processes)
        self.log = root / f"{role}.log"
        fs = root / f"fs-{role}"
        fs.mkdir()
        status_r, status_w = os.pipe()
        self.status_r = status_r
        life_r, self.life_w = os.pipe()  # the process exits when life_w closes: when we die
        fds = {**fds, "lifeline": life_r}
        config = setup_config(role, fs, iso.user_namespace, status_w, fds, limits, audit_hook=audit_hook,
                              disk=disk, cgroups=self.cgroups.procs)
        passed = [status_w, *(fd for fd in fds.values() if fd is not None)]
        cmd = [*iso.prefix, sys.executable, "-I", "-B", str(_CHILD), "setup", json.dumps(config)]
        try:
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(cmd, cwd="/", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, pass_fds=tuple(passed))
        finally:
            for fd in passed:
                os.close(fd)

    def setup_failure(self) -> str:
        return read_available(self.status_r).decode(errors="replace")

    def finish(self) -> None:
        self.cgroups.kill_all(keep=True)  # everything in the namespace, then the launcher reaps its child
        kill_tree(self.proc)
        self.cgroups.kill_all()
        os.close(self.status_r)
        os.close(self.life_w)


def _limits(iso, timeout: float, memory_mb: int, max_file_mb: int, max_processes: int) -> dict:
    return {"memory": memory_mb * 2**20, "cpu": int(timeout) + 1, "fsize": max_file_mb * 2**20,
            "nofile": 64, "nproc": process_limit(iso, max_processes)}


def _ended(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def run_python(program: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_file_mb: int = 16,
               max_processes: int = 32, isolate_network: bool = True, disk_mb: int = 64) -> SandboxResult:
    """Run ``program`` (Python source, as ``__main__``) in one sandboxed process.

    It passes when it exits with status 0; ``output`` holds the tail of what it printed. For a
    code task with tests, use :func:`run_tests`, whose verdict the program cannot forge.

    Args:
        timeout: wall-clock seconds before the whole tree is killed; ``RLIMIT_CPU`` is
            ``int(timeout) + 1`` seconds.
        memory_mb: ``RLIMIT_AS`` of the interpreter and, as root, the memory cgroup's limit
            (which also counts tmpfs and memfd pages).
        max_file_mb: largest file the program may write (``RLIMIT_FSIZE``).
        max_processes: processes and threads at once (pids cgroup as root, ``RLIMIT_NPROC`` in a
            user namespace).
        isolate_network: a network namespace without interfaces (refused where unavailable).
        disk_mb: size of the writable tmpfs (``/tmp``, the working folder) and of ``/dev/shm``.
    """
    iso = isolation(isolate_network)
    if not iso.usable:
        return SandboxResult("refused", iso.refusal or "", 0.0)
    root = Path(tempfile.mkdtemp(prefix="moeprune-exec-"))
    box = None
    try:
        source_r, source_w = os.pipe()
        start = time.monotonic()
        try:
            box = _Sandboxed("plain", root, iso, _limits(iso, timeout, memory_mb, max_file_mb, max_processes),
                             memory=memory_mb * 2**20, max_processes=max_processes, disk=disk_mb * 2**20,
                             fds={"source": source_r}, audit_hook=_AUDIT_HOOK)
        except BaseException:
            os.close(source_w)
            raise
        _writer(source_w, program.encode("utf-8", "surrogatepass"))
        try:
            code = box.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return SandboxResult("timeout", f"killed after {timeout:g}s", time.monotonic() - start, _tail(box.log))
        seconds, output = time.monotonic() - start, _tail(box.log)
        failure = box.setup_failure()
        if failure:
            return SandboxResult("refused", failure, seconds, output)
        if code < 0 or (code != 0 and box.cgroups.out_of_memory()):
            return SandboxResult("killed", "out of memory" if box.cgroups.out_of_memory() else _ended(code),
                                 seconds, output)
        if code != 0:
            return SandboxResult("failed", _last_line(output) or _ended(code), seconds, output)
        return SandboxResult("passed", "", seconds, output)
    finally:
        if box is not None:
            box.finish()
        remove_tree(root)


def run_tests(program: str, test: str, entry_point: str, *, prompt: str | None = None, timeout: float = 10.0,
              memory_mb: int = 1024, max_file_mb: int = 16, max_processes: int = 32,
              isolate_network: bool = True, disk_mb: int = 64) -> SandboxResult:
    """Run a code task: ``program`` (prompt + completion) in one sandbox, ``test`` in another.

    The test process runs ``test`` and then ``check(<entry_point>)`` with ``entry_point`` bound to a
    proxy of the program's function. With ``prompt`` (the task's own text, trusted), the helpers
    the prompt defines in full (e.g. ``encode_cyclic``) come from the test process's own run of
    the prompt, so a completion cannot redefine what the tests rely on; functions the prompt only
    declares, and those only the program defines, are proxies. Arguments and return values must be
    Python literals (numbers, strings, bytes, None and lists, tuples, dicts, sets of them).

    Passed: the test process exited 0 and wrote back the parent's nonce. Other arguments as
    :func:`run_python`, applied to each of the two processes.
    """
    iso = isolation(isolate_network)
    if not iso.usable:
        return SandboxResult("refused", iso.refusal or "", 0.0)
    nonce = secrets.token_hex(32)
    root = Path(tempfile.mkdtemp(prefix="moeprune-exec-"))
    limits = _limits(iso, timeout, memory_mb, max_file_mb, max_processes)
    common = {"iso": iso, "limits": limits, "memory": memory_mb * 2**20, "max_processes": max_processes,
              "disk": disk_mb * 2**20}
    boxes: list[_Sandboxed] = []
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    source_r, source_w = os.pipe()
    task_r, task_w = os.pipe()
    done_r, done_w = os.pipe()
    mine = {req_r, req_w, rep_r, rep_w, source_r, source_w, task_r, task_w, done_r, done_w}
    try:
        start = time.monotonic()
        mine -= {req_r, rep_w, source_r}  # _Sandboxed closes what it passed to the child
        boxes.append(_Sandboxed("program", root, **common, audit_hook=_AUDIT_HOOK,
                                fds={"source": source_r, "requests": req_r, "replies": rep_w}))
        mine -= {req_w, rep_r, task_r, done_w}
        boxes.append(_Sandboxed("test", root, **common, audit_hook=False,
                                fds={"task": task_r, "requests": req_w, "replies": rep_r, "done": done_w}))
        program_box, test_box = boxes
        mine -= {source_w, task_w}
        _writer(source_w, program.encode("utf-8", "surrogatepass"))
        task = {"test": test, "entry_point": entry_point, "prompt": prompt, "nonce": nonce}
        _writer(task_w, json.dumps(task).encode())
        try:
            code = test_box.proc.wait(timeout=max(0.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            return SandboxResult("timeout", f"killed after {timeout:g}s", time.monotonic() - start,
                                 _tail(program_box.log))
        seconds = time.monotonic() - start
        marker = read_available(done_r)
        failure = program_box.setup_failure() or test_box.setup_failure()
        if failure:
            return SandboxResult("refused", failure, seconds, _tail(program_box.log))
        if code == 0 and marker == nonce.encode():
            return SandboxResult("passed", "", seconds, _tail(program_box.log))
        if code < 0:
            return SandboxResult("killed", "tests: " + _ended(code), seconds, _tail(program_box.log))
        line = _last_line(_tail(test_box.log))
        if "the program ended" in line:
            try:  # it ended on its own (the tests only saw the pipe close): say how
                program_code = program_box.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                program_code = 0
            output = _tail(program_box.log)
            if program_box.cgroups.out_of_memory():
                return SandboxResult("killed", "program: out of memory (memory cgroup)", seconds, output)
            if program_code < 0:
                return SandboxResult("killed", "program: " + _ended(program_code), seconds, output)
            line = f"{line} ({_last_line(output) or _ended(program_code)})"
        detail = line if code != 0 else _NO_MARKER
        return SandboxResult("failed", detail or _ended(code), seconds, _tail(program_box.log))
    finally:
        for fd in mine:
            os.close(fd)
        for box in boxes:
            box.finish()
        remove_tree(root)
