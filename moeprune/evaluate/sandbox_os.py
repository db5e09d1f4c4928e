"""Operating-system containment for the code sandbox: namespaces, a pids cgroup, killing a tree.

:func:`isolation` probes once per process what this machine allows, running ``true`` through the
same launcher the sandbox uses:

- ``unshare --user --map-root-user --pid --fork --mount-proc --net --kill-child``: a user, PID,
  mount and network namespace. Inside a PID namespace the child cannot see or signal processes
  outside it (``kill``, ``pidfd_open`` and ``/proc`` only know the namespace's own processes), and
  when the namespace's first process ends the kernel kills every process left in it, including
  ones that started a new session. ``RLIMIT_NPROC`` set inside a new user namespace counts only
  that namespace's processes (without one, :func:`process_limit` adds the user's current task
  count). Fallbacks drop the user namespace (``root``), then everything but
  the network namespace (``unshare -n``), then everything.
- ``setpriv --pdeathsig KILL``: the launcher is killed if the evaluating thread dies, and
  ``--kill-child`` passes that on to the namespace.
- a ``pids`` cgroup, only when running as root (the kernel does not apply ``RLIMIT_NPROC`` to
  root): the launcher joins a fresh cgroup whose ``pids.max`` bounds the whole tree.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Isolation", "isolation", "PidsCgroup", "kill_tree", "remove_tree", "process_limit"]

_NAMESPACE_FLAGS = (
    ("--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "--kill-child"),
    ("--pid", "--fork", "--mount-proc", "--kill-child"),
    (),
)


@dataclass(frozen=True)
class Isolation:
    """What this machine allows; ``prefix`` goes before the child's command line."""

    prefix: tuple[str, ...]
    pid_namespace: bool
    user_namespace: bool
    network_namespace: bool
    parent_death_signal: bool


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=2)
def isolation(network: bool = True) -> Isolation:
    """The strongest launcher prefix that works here (probed once per process and ``network``)."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    linux = sys.platform.startswith("linux")
    death = [setpriv, "--pdeathsig", "KILL"] if setpriv and linux else []
    if death and not _works(death):
        death = []
    if unshare is None or not linux:
        return Isolation(tuple(death), False, False, False, bool(death))
    for flags in _NAMESPACE_FLAGS:
        for net in (("--net",), ()) if network else ((),):
            if not flags and not net:
                continue
            cmd = [*death, unshare, *flags, *net]
            if _works(cmd):
                return Isolation(tuple(cmd), "--pid" in flags, "--user" in flags, bool(net), bool(death))
    return Isolation(tuple(death), False, False, False, bool(death))


class PidsCgroup:
    """A fresh ``pids`` cgroup (v1 hierarchy or v2 with the controller enabled), or nothing.

    Only used as root. ``prefix`` is a shell command that moves the launcher into the cgroup
    before it runs anything else, so every descendant is counted against ``pids.max``.
    """

    def __init__(self, max_processes: int) -> None:
        self.path: Path | None = None
        if os.geteuid() != 0 or not sys.platform.startswith("linux"):
            return
        for base in (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup")):
            try:
                path = Path(tempfile.mkdtemp(prefix="moeprune-exec-", dir=base))
            except OSError:
                continue
            try:  # a real cgroup folder comes with its control files; never create them
                with open(path / "pids.max", "r+") as f:
                    f.write(str(max_processes))
                self.path = path
                return
            except OSError:
                path.rmdir()

    @property
    def prefix(self) -> tuple[str, ...]:
        if self.path is None:
            return ()
        return ("/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"))

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, then remove it."""
        if self.path is None:
            return
        procs = self.path / "cgroup.procs"
        for _ in range(100):
            try:
                pids = [int(p) for p in procs.read_text().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                _signal(pid)
            time.sleep(0.01)
        try:
            self.path.rmdir()
        except OSError:
            pass


def _user_tasks() -> int:
    """Processes and threads of this user now (what ``RLIMIT_NPROC`` counts outside a user namespace)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                pass  # ended meanwhile
    return count


def process_limit(iso: Isolation, max_processes: int) -> int:
    """The ``RLIMIT_NPROC`` to set in the child (0: none).

    In a new user namespace the limit counts only the sandbox's tasks. Without one, it counts all of
    this user's tasks, so the limit is what the user runs now plus ``max_processes`` (approximate:
    the user's other programs may start or end meanwhile). Root is not limited by the kernel
    (a pids cgroup is used instead).
    """
    if iso.user_namespace:
        return max_processes
    if os.geteuid() == 0 or not os.path.isdir("/proc"):
        return 0
    return _user_tasks() + max_processes


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (and so, with ``--kill-child``, its namespace)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    else:
        try:  # the group may outlive its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def remove_tree(root: Path) -> None:
    """Delete ``root`` even if the child removed permissions from folders in it; never follows links."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            try:
                if stat.S_ISDIR(os.lstat(full).st_mode):
                    os.chmod(full, 0o700)
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
