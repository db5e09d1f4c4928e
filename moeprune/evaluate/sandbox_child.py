"""What runs inside a sandbox: the confinement set-up, then one of the sandboxed roles.

Executed by :mod:`moeprune.evaluate.sandbox` as ``python -I -B sandbox_child.py setup CONFIG_JSON``
inside fresh mount, PID and (usually) network namespaces; never imported by moeprune; standard
library only.

**Set-up** (still privileged: root, or root of a new user namespace; no generated code has run):

1. join the memory and pids cgroups the parent made (as root);
2. build a new root file system on a tmpfs: read-only bind mounts of ``/usr``, ``/etc``, the
   library folders and the interpreter's own prefix, with every site-packages folder covered by
   an empty read-only tmpfs for the ``program`` role (and ``_ctypes`` replaced by an empty file);
   a minimal ``/dev`` (null, zero, full, random, urandom, a size-limited ``/dev/shm``); a
   size-limited writable ``/tmp`` (the working folder, also ``HOME`` and ``TMPDIR``); no
   ``/proc``, no ``/sys``, no home folders, no repository, no task data;
3. drop privileges: as root, ``setgroups([])`` + ``setresgid``/``setresuid`` to 65534; in a user
   namespace, a nested user namespace that maps only uid/gid 65534 (so the program holds no
   capability over the mounts); then ``chroot`` (a chrooted process may not create user
   namespaces, so it cannot regain ``CAP_SYS_CHROOT``) and ``PR_SET_NO_NEW_PRIVS``;
4. ``exec`` a fresh interpreter that runs this file's source again in the requested role.

**Roles**: ``plain`` runs a whole program (``run_python``); ``program`` runs model-written code
and then serves calls to its functions over a pipe; ``test`` runs the task's tests, calling the
program's functions through proxies, and writes the parent's nonce only after ``check`` returned;
``probe`` checks that the confinement holds (used by ``isolation()``).

Values cross between ``program`` and ``test`` only as Python literals, written by :func:`encode`
and read back by :func:`decode`, which accepts nothing but literal syntax; a test process never
runs code of the program.
"""

import ast
import json
import os
import resource
import sys
import threading

UID = 65534
_MAX_MESSAGE = 16 * 2**20
_MAX_DEPTH = 200
_LITERAL_FLOATS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}

# --- set-up (privileged) -------------------------------------------------------------------

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
CLONE_NEWUSER = 0x10000000
PR_SET_NO_NEW_PRIVS = 38
_DEVICES = ("null", "zero", "full", "random", "urandom")
_SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")


class SetupError(Exception):
    pass


def _libc():
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
        if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
            err = ctypes.get_errno()
            raise SetupError("mount %s on %s: %s" % (source or fstype, target, os.strerror(err)))

    def unshare(flags):
        if libc.unshare(flags) != 0:
            raise SetupError("unshare: " + os.strerror(ctypes.get_errno()))

    def no_new_privs():
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SetupError("prctl(NO_NEW_PRIVS): " + os.strerror(ctypes.get_errno()))
    return mount, unshare, no_new_privs


def _bind_flags(path):
    """Flags for a read-only bind remount that keep the flags a user namespace may not clear."""
    st = os.statvfs(path).f_flag
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    flags |= st & (MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)
    if st & 4096:  # ST_RELATIME
        flags |= MS_RELATIME
    return flags


def _mount_points_under(root):
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return points


def _build_root(config, mount):
    new = config["root"]
    role = config["role"]
    size = "size=%dk" % (config["disk"] // 1024)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    binds = [p for p in _SYSTEM if os.path.isdir(p) and not os.path.islink(p)]
    for p in config["prefixes"]:
        if not any(p == b or p.startswith(b + "/") for b in binds):
            binds.append(p)
    for p in _SYSTEM:
        if os.path.islink(p):
            os.symlink(os.readlink(p), new + p)
    for p in binds:
        os.makedirs(new + p, exist_ok=True)
        mount(p, new + p, None, MS_BIND | MS_REC)
    if role in ("program", "plain", "probe"):
        for p in config["hide"]:
            if os.path.isdir(new + p):
                mount("tmpfs", new + p, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=755")
            elif os.path.isfile(new + p):
                empty = new + "/.empty"
                if not os.path.exists(empty):
                    open(empty, "w").close()
                mount(empty, new + p, None, MS_BIND)
    os.makedirs(new + "/dev")
    mount("tmpfs", new + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name in _DEVICES:
        open(new + "/dev/" + name, "w").close()
        mount("/dev/" + name, new + "/dev/" + name, None, MS_BIND)
    os.makedirs(new + "/dev/shm")
    mount("tmpfs", new + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, size + ",mode=1777")
    os.makedirs(new + "/tmp")
    mount("tmpfs", new + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, size + ",mode=1777")
    os.makedirs(new + "/var")
    os.symlink("/tmp", new + "/var/tmp")
    writable = {new + "/tmp", new + "/dev/shm"} | {new + "/dev/" + d for d in _DEVICES}
    for point in _mount_points_under(new):
        if point not in writable:
            mount(None, point, None, _bind_flags(point))
    return new


def _map_to_unprivileged(unshare):
    """In a user namespace: a nested one where this process is uid/gid 65534 and nothing else."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER)
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write("%d %d 1" % (UID, uid))
    with open("/proc/self/gid_map", "w") as f:
        f.write("%d %d 1" % (UID, gid))


def _setup(config):
    """Confine this process (still privileged), then exec the sandboxed interpreter."""
    fail_fd = config["status_fd"]
    try:
        for procs in config.get("cgroups", ()):
            with open(procs, "w") as f:
                f.write("0")
        mount, unshare, no_new_privs = _libc()
        with open(__file__, encoding="utf-8") as f:
            source = f.read()
        new = _build_root(config, mount)
        if config["user_namespace"]:
            _map_to_unprivileged(unshare)
        os.chroot(new)
        os.chdir("/tmp")
        if not config["user_namespace"]:
            os.setgroups([])
            os.setresgid(UID, UID, UID)
            os.setresuid(UID, UID, UID)
        no_new_privs()
    except (OSError, SetupError) as e:
        os.write(fail_fd, ("sandbox set-up failed: %s" % e).encode()[:500])
        os._exit(70)
    os.close(fail_fd)
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
           "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = {k: config[k] for k in ("role", "limits", "fds", "audit_hook")}
    os.execve(config["python"], [config["python"], "-I", "-B", "-c", source, "run", json.dumps(args)], env)


# --- literals across the boundary ----------------------------------------------------------

def encode(value, depth=0):
    """A Python literal for ``value`` (None, bool, int, float, complex, str, bytes and containers)."""
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if value is None or value is True or value is False:
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        value = float(value)
        return repr(value) if value == value and value not in (float("inf"), float("-inf")) \
            else "float(%r)" % repr(value)
    if isinstance(value, complex):
        return "complex(%s, %s)" % (encode(value.real, depth + 1), encode(value.imag, depth + 1))
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [encode(v, depth + 1) for v in value]
        if isinstance(value, list):
            return "[" + ", ".join(items) + "]"
        if isinstance(value, tuple):
            return "(" + "".join(i + ", " for i in items) + ")"
        body = "{" + ", ".join(items) + "}" if items else ""
        return ("frozenset(%s)" if isinstance(value, frozenset) else "set(%s)") % body
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (encode(k, depth + 1), encode(v, depth + 1))
                               for k, v in value.items()) + "}"
    raise TypeError("a %s cannot cross the sandbox boundary (only literals can)" % type(value).__name__)


def decode(text):
    """The value of a literal written by :func:`encode`; anything else raises ``ValueError``."""
    if len(text) > _MAX_MESSAGE:
        raise ValueError("message too large")
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        raise ValueError("not a literal: %s" % type(e).__name__) from None
    return _value(tree, 0)


def _value(node, depth):
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    kind = type(node)
    if kind is ast.Constant and type(node.value) in (int, float, complex, str, bytes, bool, type(None)):
        return node.value
    if kind is ast.UnaryOp and type(node.op) in (ast.USub, ast.UAdd):
        operand = _value(node.operand, depth + 1)
        if type(operand) in (int, float, complex):
            return -operand if type(node.op) is ast.USub else operand
    if kind in (ast.List, ast.Tuple, ast.Set):
        items = [_value(e, depth + 1) for e in node.elts]
        return list(items) if kind is ast.List else tuple(items) if kind is ast.Tuple else set(items)
    if kind is ast.Dict and None not in node.keys:
        return {_value(k, depth + 1): _value(v, depth + 1) for k, v in zip(node.keys, node.values)}
    if kind is ast.Call and type(node.func) is ast.Name and not node.keywords:
        name, args = node.func.id, [_value(a, depth + 1) for a in node.args]
        if name == "float" and len(args) == 1 and args[0] in _LITERAL_FLOATS:
            return _LITERAL_FLOATS[args[0]]
        if name == "complex" and len(args) == 2 and all(type(a) is float for a in args):
            return complex(*args)
        if name in ("set", "frozenset") and len(args) <= 1 and (not args or type(args[0]) is set):
            return (set if name == "set" else frozenset)(args[0] if args else ())
    raise ValueError("not a literal: %s" % kind.__name__)


def send(fd, text):
    data = text.encode("utf-8", "surrogatepass")
    if len(data) > _MAX_MESSAGE:
        raise ValueError("message too large")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    """The next message, or None at end of file; ``ValueError`` for a malformed or oversized one."""
    head = _read_exactly(fd, 8)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > _MAX_MESSAGE:
        raise ValueError("message too large")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return body.decode("utf-8", "surrogatepass")


# --- the sandboxed roles -------------------------------------------------------------------

_BLOCKED = frozenset((
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "pty.spawn", "os.symlink", "os.link",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
    "sys._current_exceptions", "os.chroot", "os.setuid", "os.setgid",
))
_BLOCKED_IMPORTS = frozenset(("_posixsubprocess", "_xxsubinterpreters", "_interpreters"))
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,),
                "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
                "shutil.move": (0, 1), "os.chflags": (0,), "os.lchmod": (0,)}


def _make_hook(root, sep=os.sep, realpath=os.path.realpath, fsdecode=os.fsdecode):
    """Defence in depth only: the verdict and the containment do not depend on this hook."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return True
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
    import _posixsubprocess
    import subprocess

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: starting processes is not allowed")
    _posixsubprocess.fork_exec = fork_exec
    subprocess._fork_exec = fork_exec


def _set_limits(limits):
    pairs = [(resource.RLIMIT_AS, limits["memory"]), (resource.RLIMIT_CPU, limits["cpu"]),
             (resource.RLIMIT_FSIZE, limits["fsize"]), (resource.RLIMIT_CORE, 0),
             (resource.RLIMIT_NOFILE, limits["nofile"])]
    if limits.get("nproc"):
        pairs.append((resource.RLIMIT_NPROC, limits["nproc"]))
    for which, value in pairs:
        resource.setrlimit(which, (value, value))


def _exit_with_the_evaluator(fd):
    def watch():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        os._exit(1)
    threading.Thread(target=watch, name="lifeline", daemon=True).start()


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8")


def _guard(config):
    if config["audit_hook"]:
        _disarm_process_creation()
        sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))


def _run_program_source(source, config):
    _guard(config)
    sys.argv = ["program.py"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    exec(compile(source, "program.py", "exec"), namespace)
    return namespace


def _role_plain(fds, config):
    _run_program_source(_read_all(fds["source"]), config)


def _role_program(fds, config):
    """Run the model-written code, then answer calls ``(name, args, kwargs)`` until end of file."""
    source = _read_all(fds["source"])
    requests, replies = fds["requests"], fds["replies"]
    try:
        namespace = _run_program_source(source, config)
    except BaseException as e:
        send(replies, encode(("load_error", "%s: %s" % (type(e).__name__, str(e)[:300]))))
        raise
    names = [n for n, v in list(namespace.items()) if isinstance(n, str) and callable(v)]
    send(replies, encode(("ready", names[:1000])))
    while True:
        message = receive(requests)
        if message is None:
            os._exit(0)
        name, args, kwargs = decode(message)
        try:
            value = namespace[name](*args, **kwargs)
            reply = encode(("ok", value))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the tests
            try:
                reply = encode(("error", type(e).__name__, str(e)[:1000]))
            except BaseException:
                reply = encode(("error", "Exception", "unprintable error"))
        send(replies, reply)


def _gone(why):
    sys.stderr.write("sandbox: %s\n" % why)
    sys.stderr.flush()
    os._exit(3)


def _stub_functions(prompt_tree):
    """Top-level functions of the prompt whose body is only a docstring, ``pass`` or ``...``."""
    stubs = set()
    for node in prompt_tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if all(isinstance(s, ast.Pass) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                   for s in node.body):
                stubs.add(node.name)
    return stubs


def _role_test(fds, config):
    """Run the task's tests against proxies of the program's functions; the nonce only at the end."""
    import builtins
    import keyword

    task = json.loads(_read_all(fds["task"]))
    nonce = task.pop("nonce").encode()
    requests, replies = fds["requests"], fds["replies"]

    def call_program(name, args, kwargs):
        try:
            send(requests, encode((name, args, kwargs)))
        except (TypeError, ValueError) as e:
            raise TypeError("argument cannot be sent to the program: %s" % e) from None
        except OSError:
            _gone("the program ended during a call to %s" % name)
        try:
            message = receive(replies)
            reply = decode(message) if message is not None else None
        except (OSError, ValueError) as e:
            _gone("malformed reply from the program (%s)" % e)
        if reply is None:
            _gone("the program ended during a call to %s" % name)
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if (type(reply) is tuple and len(reply) == 3 and reply[0] == "error"
                and type(reply[1]) is str and type(reply[2]) is str):
            cls = getattr(builtins, reply[1], None)
            if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == "builtins":
                try:
                    error = cls(reply[2])
                except Exception:
                    error = RuntimeError("%s: %s" % tuple(reply[1:]))
            else:
                error = RuntimeError("%s: %s" % tuple(reply[1:]))
            raise error
        _gone("malformed reply from the program")

    def proxy(name):
        def call(*args, **kwargs):
            return call_program(name, args, kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    try:
        first = receive(replies)
        ready = decode(first) if first is not None else None
    except (OSError, ValueError):
        ready = None
    if type(ready) is tuple and len(ready) == 2 and ready[0] == "load_error" and type(ready[1]) is str:
        _gone("the program failed before its tests ran: " + ready[1][-300:])
    if not (type(ready) is tuple and len(ready) == 2 and ready[0] == "ready" and type(ready[1]) is list):
        _gone("the program ended before its tests ran")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    for name in ready[1]:
        if (type(name) is str and name.isidentifier() and not keyword.iskeyword(name)
                and not name.startswith("__") and not hasattr(builtins, name)):
            namespace[name] = proxy(name)
    prompt = task.get("prompt")
    if prompt is not None:  # the task's own helpers, not the program's versions of them
        for text in (prompt, prompt + "\n    pass\n"):
            try:
                tree = ast.parse(text)
            except (SyntaxError, ValueError):
                continue
            trusted = dict(namespace)
            try:
                exec(compile(tree, "prompt.py", "exec"), trusted)
            except Exception:
                break
            for name in _stub_functions(tree):
                if name in namespace:
                    trusted[name] = namespace[name]
            namespace = trusted
            break
    entry = task["entry_point"]
    namespace[entry] = proxy(entry)
    sys.argv = ["test.py"]
    exec(compile(task["test"] + "\n\ncheck(%s)\n" % entry, "test.py", "exec"), namespace)
    os.write(fds["done"], nonce)


def _role_probe(fds, config):
    problems = []
    if os.getuid() == 0 or os.geteuid() == 0:
        problems.append("still uid 0")
    for path in ("/usr/moeprune-probe", "/etc/moeprune-probe"):
        try:
            open(path, "w").close()
            problems.append("could write " + path)
        except OSError:
            pass
    open("/tmp/probe", "w").close()
    if problems:
        _gone("confinement probe: " + ", ".join(problems))


def _run(args):
    fds = args["fds"]
    if fds.get("lifeline") is not None:
        _exit_with_the_evaluator(fds["lifeline"])
    _set_limits(args["limits"])
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    role = {"plain": _role_plain, "program": _role_program, "test": _role_test, "probe": _role_probe}
    role[args["role"]](fds, args)


if __name__ == "__main__":
    if sys.argv[1] == "setup":
        _setup(json.loads(sys.argv[2]))
    else:
        _run(json.loads(sys.argv[2]))
