"""Operating-system containment for the code sandbox: the launcher, cgroups, killing a tree.

Every sandboxed process is started as::

    [setpriv --pdeathsig KILL] unshare [--user --map-root-user] --mount --pid --fork --kill-child \
        [--net] python -I -B sandbox_child.py setup CONFIG

``--user --map-root-user`` is used only when not running as root (as root, the set-up drops to
uid 65534 itself, which a one-uid user namespace cannot map). The set-up stage (see
``sandbox_child.py``) builds a read-only root file system, drops privileges and execs the
sandboxed interpreter.

:func:`isolation` probes once per process whether that whole chain works here, by running it with
the ``probe`` role. Where it does not, :attr:`Isolation.refusal` says why in one line and the
sandbox refuses to run code (it never runs code with less containment than documented).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Isolation", "isolation", "Cgroups", "PidsCgroup", "kill_tree", "remove_tree", "process_limit",
           "hidden_paths", "interpreter_prefixes"]

CHILD = Path(__file__).with_name("sandbox_child.py")
_HOW_TO = ("run as root, or enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 "
           "/ user.max_user_namespaces > 0, no AppArmor restriction) and install util-linux")


@dataclass(frozen=True)
class Isolation:
    """What this machine allows; ``prefix`` goes before the sandboxed command line.

    ``refusal`` is None when the full confinement works, else a one-line reason why code is not run.
    """

    prefix: tuple[str, ...]
    pid_namespace: bool
    user_namespace: bool
    network_namespace: bool
    parent_death_signal: bool
    mount_namespace: bool = False
    refusal: str | None = None
    memory_cgroup: bool = False

    @property
    def usable(self) -> bool:
        return self.refusal is None


def interpreter_prefixes() -> list[str]:
    """Folders that hold this interpreter and its standard library (bound read-only into the sandbox)."""
    exe = os.path.realpath(sys.executable)
    paths = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix),
             os.path.dirname(exe), os.path.realpath(sysconfig.get_paths()["stdlib"])}
    return sorted(paths)


def hidden_paths(extra: tuple[str, ...] = ()) -> list[str]:
    """What the program must not read inside the bound folders: installed packages (task data,
    moeprune itself), ``_ctypes``, and ``extra``."""
    paths = set(site.getsitepackages()) | {site.getusersitepackages()}
    paths |= {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    paths |= {"/usr/lib/python3/dist-packages", "/usr/local/lib/python3/dist-packages"}
    paths.add(str(Path(__file__).resolve().parents[1]))  # the moeprune package
    dynload = Path(sysconfig.get_paths()["stdlib"]) / "lib-dynload"
    if dynload.is_dir():
        paths |= {str(p) for p in dynload.glob("_ctypes*")}
    paths |= set(extra)
    return sorted(os.path.realpath(p) for p in paths if p)


def _last_line(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text.splitlines()[-1] if text else ""


def _probe(prefix: list[str], user_namespace: bool) -> str | None:
    """Run the whole chain with the ``probe`` role; None when it works, else why not."""
    root = Path(tempfile.mkdtemp(prefix="moeprune-exec-"))
    try:
        (root / "fs").mkdir()
        status_r, status_w = os.pipe()
        source_r, source_w = os.pipe()
        os.close(source_w)
        config = setup_config("probe", root / "fs", user_namespace, status_w,
                              {"source": source_r, "lifeline": None},
                              {"memory": 512 * 2**20, "cpu": 10, "fsize": 2**20, "nofile": 64, "nproc": 0},
                              audit_hook=False, disk=2**20)
        try:
            done = subprocess.run([*prefix, sys.executable, "-I", "-B", str(CHILD), "setup", json.dumps(config)],
                                  capture_output=True, timeout=30, pass_fds=(status_w, source_r),
                                  stdin=subprocess.DEVNULL)
        finally:
            os.close(status_w)
            os.close(source_r)
        status = read_available(status_r)
        os.close(status_r)
        if done.returncode == 0:
            return None
        return status.decode(errors="replace") or _last_line(done.stderr) or f"exit code {done.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    finally:
        remove_tree(root)


def read_available(fd: int, size: int = 4096) -> bytes:
    """Up to `size` bytes already in the pipe `fd`, without waiting (b"" when there are none)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return b""


def setup_config(role: str, root: Path, user_namespace: bool, status_fd: int, fds: dict, limits: dict, *,
                 audit_hook: bool, disk: int, cgroups: tuple[str, ...] = (), hide: tuple[str, ...] = ()) -> dict:
    return {"role": role, "root": str(root), "user_namespace": user_namespace, "status_fd": status_fd,
            "fds": fds, "limits": limits, "audit_hook": audit_hook, "disk": disk, "cgroups": list(cgroups),
            "python": os.path.realpath(sys.executable), "prefixes": interpreter_prefixes(),
            "hide": hidden_paths(hide)}


@functools.lru_cache(maxsize=2)
def isolation(network: bool = True) -> Isolation:
    """The launcher for this machine, probed once per process and ``network`` setting."""
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    if not sys.platform.startswith("linux"):
        return Isolation((), False, False, False, False, refusal="the code sandbox needs Linux namespaces")
    if unshare is None:
        return Isolation((), False, False, False, False, refusal="unshare not found: install util-linux")
    death = [setpriv, "--pdeathsig", "KILL"] if setpriv else []
    root = os.geteuid() == 0
    flags = ([] if root else ["--user", "--map-root-user"]) + ["--mount", "--pid", "--fork", "--kill-child"]
    if network:
        flags.append("--net")
    for launcher in ([*death, unshare, *flags], [unshare, *flags]) if death else ([unshare, *flags],):
        reason = _probe(launcher, not root)
        if reason is None:
            return Isolation(tuple(launcher), True, not root, network, launcher[:1] == death[:1] and bool(death),
                             mount_namespace=True, memory_cgroup=root and Cgroups.available())
    what = "user, mount, PID" + (" and network" if network else "") + " namespaces"
    return Isolation((), False, False, False, False,
                     refusal=f"cannot confine generated code ({what}, read-only root, uid 65534): "
                             f"{reason}; {_HOW_TO}")


class Cgroups:
    """A fresh memory and pids cgroup (v1 hierarchies or v2), only as root; ``procs`` lists the
    ``cgroup.procs`` files the sandboxed process joins at set-up."""

    _V1 = Path("/sys/fs/cgroup")

    def __init__(self, memory_bytes: int, max_processes: int) -> None:
        self.paths: list[Path] = []
        self.procs: tuple[str, ...] = ()
        self.memory = False
        if os.geteuid() != 0 or not sys.platform.startswith("linux"):
            return
        if (self._V1 / "memory").is_dir() or (self._V1 / "pids").is_dir():
            self._make(self._V1 / "memory", {"memory.limit_in_bytes": memory_bytes,
                                             "memory.memsw.limit_in_bytes": memory_bytes}, "memory")
            self._make(self._V1 / "pids", {"pids.max": max_processes}, "pids")
        elif (self._V1 / "cgroup.controllers").is_file():
            self._make(self._V1, {"memory.max": memory_bytes, "memory.swap.max": 0,
                                  "pids.max": max_processes}, "memory")
        self.procs = tuple(str(p / "cgroup.procs") for p in self.paths)

    @classmethod
    def available(cls) -> bool:
        probe = cls(64 * 2**20, 8)
        try:
            return probe.memory
        finally:
            probe.kill_all()

    def _make(self, base: Path, limits: dict, kind: str) -> None:
        try:
            path = Path(tempfile.mkdtemp(prefix="moeprune-exec-", dir=base))
        except OSError:
            return
        ok = False
        for name, value in limits.items():
            try:  # a real cgroup folder comes with its control files; never create them
                with open(path / name, "r+") as f:
                    f.write(str(value))
                ok = ok or name.startswith(kind)
            except OSError:
                pass
        if ok:
            self.paths.append(path)
            self.memory = self.memory or kind == "memory"
        else:
            path.rmdir()

    def out_of_memory(self) -> bool:
        """Whether the kernel killed a process of these cgroups for going past the memory limit."""
        for path in self.paths:
            for name in ("memory.oom_control", "memory.events"):
                try:
                    lines = (path / name).read_text().splitlines()
                except OSError:
                    continue
                if any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in lines):
                    return True
        return False

    def kill_all(self, keep: bool = False) -> None:
        """SIGKILL every process left in the cgroups, then remove them (unless ``keep``)."""
        for path in self.paths:
            procs = path / "cgroup.procs"
            for _ in range(200):
                try:
                    pids = [int(p) for p in procs.read_text().split()]
                except OSError:
                    break
                if not pids:
                    break
                for pid in pids:
                    _signal(pid)
                time.sleep(0.01)
            if keep:
                continue
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        if not keep:
            self.paths = []


class PidsCgroup(Cgroups):
    """A pids-only view kept for callers of the earlier API (``path`` is its folder or None)."""

    def __init__(self, max_processes: int) -> None:
        super().__init__(2**40, max_processes)
        self.path = next((p for p in self.paths if "pids" in str(p) or p.parent == self._V1), None)


def process_limit(iso: Isolation, max_processes: int) -> int:
    """The ``RLIMIT_NPROC`` to set in the sandbox (0: none).

    In a user namespace the limit counts only the sandbox's tasks. As root the sandbox runs as uid
    65534, whose count spans every sandbox of this machine, so the pids cgroup bounds it instead.
    """
    return max_processes if iso.user_namespace else 0


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """End the sandbox started by ``proc`` and wait until the launcher has reaped it.

    The namespace's first process (the launcher's child) is killed first, so the kernel kills the
    rest of its PID namespace and the launcher reaps it before it exits itself; then the launcher's
    process group is killed too, in case anything is left.
    """
    if proc.returncode is None:
        for child in _children(proc.pid):
            _signal(child)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.returncode is None:
        proc.wait()


def remove_tree(root: Path) -> None:
    """Delete ``root`` even if a process removed permissions from folders in it; never follows links."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            try:
                if stat.S_ISDIR(os.lstat(full).st_mode):
                    os.chmod(full, 0o700)
            except OSError:
                pass
    shutil.rmtree(root, ignore_errors=True)
