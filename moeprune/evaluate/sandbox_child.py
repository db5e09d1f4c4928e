"""The program the sandbox child runs: limits, an audit hook, the generated code, then the marker.

Executed as a script (``python -I -B sandbox_child.py CONFIG_JSON``) by
:func:`moeprune.evaluate.sandbox.run_python`, never imported by moeprune; standard library only.

The evidence that the tests ran to completion is a random nonce that the parent writes into a
pipe before the child starts. This script reads it and closes that pipe before the generated code
runs, and writes it to a second pipe only after the generated code (which ends with
``check(entry_point)``) has returned. Exiting early (``os._exit(0)``, ``SystemExit(0)``) therefore
leaves no marker and the parent reports a failure, whatever the exit status. The nonce is in this
process's memory while the generated code runs, so code written to read the interpreter's frames
(``sys._getframe``) can still forge it: this defeats early exits, it is not a security boundary.

The evaluator also holds the write end of a "lifeline" pipe whose read end this script watches
from a thread: when the evaluator dies, however early, the read returns and this process exits
(and, as the first process of its PID namespace, takes every process in it along). This backs up
``setpriv --pdeathsig``, which misses an evaluator that dies before the launcher has set it.
"""

import json
import os
import resource
import sys
import threading

_BLOCKED = frozenset((
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "os.symlink", "os.link",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "sys._current_exceptions",
    "os.chroot", "os.setuid", "os.setgid",
))
# Modules whose import is refused: process creation that raises no audit event of its own.
_BLOCKED_IMPORTS = frozenset(("_posixsubprocess",))
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                "shutil.move": (0, 1), "os.chflags": (0,), "os.lchmod": (0,)}


def _make_hook(root, sep=os.sep, realpath=os.path.realpath, fsdecode=os.fsdecode):
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True  # an already-open descriptor; its opening was checked
        full = realpath(fsdecode(path))
        return full == root or full.startswith(root + sep)

    def refuse(what):
        raise PermissionError("sandbox: %s is not allowed" % what)

    def hook(event, args):
        if event in _BLOCKED:
            refuse(event)
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writing = (isinstance(flags, int) and flags & write_flags) or (
                isinstance(mode, str) and any(c in mode for c in "wax+"))
            if writing and not inside(path):
                refuse("writing outside the working directory (%r)" % (path,))
            if realpath(fsdecode(path)).startswith("/proc/"):
                refuse("opening %r" % (path,))  # /proc/self/mem would expose this process
        elif event == "import" and args[0] in _BLOCKED_IMPORTS:
            refuse("importing " + args[0])
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    refuse("%s outside the working directory" % event)
        elif (event == "object.__setattr__" and type(args[0]).__name__ == "function"
              and args[1] == "__code__"):
            refuse("replacing a function's " + args[1])
    return hook


def _disarm_process_creation():
    """Replace the one process-starting function that raises no audit event.

    ``_posixsubprocess.fork_exec`` (used by ``subprocess`` and ``multiprocessing``) is imported
    here, before the hook, and swapped for a function that refuses; importing it afresh (after
    removing it from ``sys.modules``) is refused by the hook.
    """
    import _posixsubprocess
    import subprocess

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")
    _posixsubprocess.fork_exec = fork_exec
    subprocess._fork_exec = fork_exec


def _set_limits(config):
    limits = [(resource.RLIMIT_AS, config["memory"]), (resource.RLIMIT_CPU, config["cpu"]),
              (resource.RLIMIT_FSIZE, config["fsize"]), (resource.RLIMIT_CORE, 0)]
    if config.get("nproc"):
        limits.append((resource.RLIMIT_NPROC, config["nproc"]))
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _exit_with_the_evaluator(fd):
    """End this process when the evaluator's end of the lifeline closes (or ``fd`` is closed)."""
    def watch():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os._exit(1)
    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _run(config):
    if config.get("lifeline_fd") is not None:
        _exit_with_the_evaluator(config["lifeline_fd"])
    nonce = os.read(config["nonce_fd"], 256)
    os.close(config["nonce_fd"])
    done_fd = config["done_fd"]
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    _set_limits(config)
    _disarm_process_creation()
    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
    sys.argv = ["program.py"]
    code = compile(source, "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    os.write(done_fd, nonce)


if __name__ == "__main__":
    _run(json.loads(sys.argv[1]))
