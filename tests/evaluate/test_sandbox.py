"""The code-execution sandbox: generated code runs in confined child processes."""

from __future__ import annotations

import tempfile
import time

import pytest

from moeprune.evaluate import sandbox
from moeprune.evaluate.sandbox import run_python, run_tests
from moeprune.evaluate.scorers import CodeExec, build_program

ROW = {
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}


def test_correct_solution_passes_and_wrong_one_fails():
    result = CodeExec(workers=2).score(["    return a + b\n", "    return a - b\n"], [ROW, ROW])
    assert result.per_sample == [1.0, 0.0]
    assert result.details[0] == "passed"
    assert result.details[1].startswith("failed: AssertionError")


def test_build_program_is_prompt_completion_test_and_check():
    program = build_program("    return a + b\n", ROW)
    assert program.startswith(ROW["prompt"] + "    return a + b\n")
    assert program.rstrip().endswith("check(add)")


def test_syntax_error_fails():
    assert run_python("def f(:\n").status == "failed"


def test_infinite_loop_is_killed_within_the_timeout():
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout=1.0)
    assert result.status in ("timeout", "killed")
    assert time.monotonic() - start < 5


def test_sleeping_program_is_killed_by_the_wall_timeout():
    result = run_python("import time\ntime.sleep(60)\n", timeout=1.0)
    assert result.status == "timeout"
    assert result.seconds < 5


def test_memory_bomb_is_stopped():
    result = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n",
                        timeout=10.0, memory_mb=256)
    assert not result.passed
    assert result.status == "killed" or "MemoryError" in result.detail
    assert result.seconds < 9


def test_writing_outside_the_temp_dir_fails(tmp_path):
    target = tmp_path / "escaped.txt"  # not even visible inside: the program has its own root
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "Error" in result.detail
    assert not target.exists()
    for path in ("/escaped.txt", "/usr/escaped.txt", "/etc/escaped.txt"):
        assert run_python(f"open({path!r}, 'w').write('x')\n").status == "failed"
        assert not os.path.exists(path)


@pytest.mark.parametrize("code", [
    "import os\nos.remove('/etc/hostname')\n",
    "import os\nos.rename('/etc/hostname', 'x')\n",
    "import shutil\nshutil.rmtree('/usr/definitely-not-here')\n",
    "import os\nos.open('/etc/sandbox-escape', os.O_WRONLY | os.O_CREAT)\n",
])
def test_destructive_calls_outside_the_temp_dir_are_refused(code, monkeypatch):
    result = run_python(code)
    assert result.status == "failed" and "PermissionError" in result.detail  # the audit hook
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)
    result = run_python(code)  # the kernel: a read-only root, uid 65534
    assert result.status == "failed", result
    assert os.path.exists("/etc/hostname") or not os.path.exists("/etc")
    assert not os.path.exists("/etc/sandbox-escape")


def test_writing_inside_the_temp_dir_works():
    code = ("import os\nwith open('out.txt', 'w') as f:\n    f.write('hello')\n"
            "assert open('out.txt').read() == 'hello'\nos.remove('out.txt')\n")
    assert run_python(code).passed


def test_opening_a_socket_fails():
    result = run_python("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n")
    assert result.status == "failed" and "PermissionError" in result.detail


def test_starting_processes_fails():
    for code in ("import subprocess\nsubprocess.run(['true'])\n", "import os\nos.system('true')\n"):
        result = run_python(code)
        assert result.status == "failed" and "PermissionError" in result.detail


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("MOEPRUNE_SECRET_FOR_TEST", "x")
    assert run_python("import os\nassert 'MOEPRUNE_SECRET_FOR_TEST' not in os.environ\n").passed


def test_typing_and_namedtuple_still_work():
    code = "from typing import List\nimport collections\nP = collections.namedtuple('P', 'a b')\nassert P(1, 2).b == 2\n"
    assert run_python(code).passed


# --- Hostile programs (issue 12). The OS-level tests also run with the audit hook switched off
# ("bypassed"), to show that the namespace / limit / cgroup layer holds on its own.

import os
import signal
import subprocess
import sys
from pathlib import Path

from moeprune.evaluate.sandbox_os import isolation

REPO = Path(__file__).resolve().parents[2]
_BOUND = isolation(True).user_namespace or (os.geteuid() == 0 and Path("/sys/fs/cgroup").is_dir())


def _no_hook(monkeypatch) -> None:
    """Run the sandbox without its audit hook: what remains is what the kernel enforces."""
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", False)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes() or text in os.readlink(entry / "cwd"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("ending", ["import os\nos._exit(0)\n", "raise SystemExit(0)\n",
                                    "import sys\nsys.exit()\n"])
def test_exiting_with_status_0_before_the_tests_is_a_failure(ending):
    result = run_tests(ROW["prompt"] + "    return a - b\n" + ending, ROW["test"], "add", prompt=ROW["prompt"])
    assert result.status == "failed" and "before its tests ran" in result.detail


def test_exiting_with_status_0_during_a_call_is_a_failure():
    result = run_tests(ROW["prompt"] + "    import os\n    os._exit(0)\n", ROW["test"], "add")
    assert result.status == "failed" and "ended during a call" in result.detail


def test_writing_guesses_to_every_descriptor_does_not_forge_a_pass():
    code = ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'0' * 64)\n"
            "    except OSError:\n        pass\nos._exit(0)\n")
    assert run_tests(ROW["prompt"] + "    return a - b\n" + code, ROW["test"], "add").status == "failed"


def test_posixsubprocess_fork_exec_is_refused():
    code = ("import _posixsubprocess as p\np.fork_exec([b'/bin/true'], [b'/bin/true'], True, (), None, "
            "None, -1, -1, -1, -1, -1, -1, -1, -1, False, False, -1, None, None, None, -1, None, False)\n")
    assert "PermissionError" in run_python(code).detail
    reloaded = "import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess\n"
    assert "PermissionError" in run_python(reloaded).detail


@pytest.mark.skipif(not _BOUND, reason="no user namespace and no pids cgroup here")
def test_thread_bomb_is_bounded_by_the_process_limit():
    code = ("import threading, time\nn = 0\ntry:\n    for _ in range(300):\n"
            "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n        n += 1\n"
            "except RuntimeError:\n    pass\nassert n < 16, n\nimport os\nos._exit(3)\n")
    result = run_python(code, max_processes=16)
    assert result.status == "failed" and result.detail == "exit code 3"


@pytest.mark.skipif(not _BOUND, reason="no user namespace and no pids cgroup here")
def test_fork_bomb_past_the_audit_hook_is_bounded(tmp_path, monkeypatch):
    _no_hook(monkeypatch)
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(200):\n        if os.fork() == 0:\n"
            "            time.sleep(30)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
            "print(n)\nassert n < 16, n\n")
    result = run_python(code, max_processes=16, timeout=20)
    assert result.passed, result
    assert result.seconds < 15  # the sleeping children did not hold the sandbox open


@pytest.mark.skipif(not isolation(True).pid_namespace, reason="no PID namespace here")
def test_new_session_shell_past_the_audit_hook_is_killed_on_return(tmp_path, monkeypatch):
    _no_hook(monkeypatch)
    code = ("import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 1234.5'], start_new_session=True)\n"
            "subprocess.Popen(['setsid', 'sleep', '1234.5'])\nimport time\ntime.sleep(0.5)\n")
    assert run_python(code).passed
    assert _processes_mentioning("1234.5") == []


# A stand-in evaluator in its own process; it imports only the sandbox modules (not torch).
_EVALUATOR = """
import os, sys, types
from pathlib import Path
for name in ("moeprune", "moeprune.evaluate"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = [os.path.join(os.getcwd(), *name.split("."))]
from moeprune.evaluate import sandbox
if sys.argv[2] == "bypass":
    sandbox._AUDIT_HOOK = False
if sys.argv[2] == "no-death-signal":  # the launcher without setpriv: only the lifeline is left
    import dataclasses
    iso = sandbox.isolation(True)
    cut = 3 if iso.parent_death_signal else 0
    sandbox.isolation = lambda network=True: dataclasses.replace(iso, prefix=iso.prefix[cut:],
                                                                 parent_death_signal=False)
pid = os.getpid()
code = open(sys.argv[1]).read().replace("EVALUATOR_PID", str(pid))
print("result", sandbox.run_python(code, timeout=10).status, flush=True)
"""

_KILLER = """
import os, signal
for attack in (lambda: signal.pidfd_send_signal(os.pidfd_open(os.getppid()), signal.SIGKILL),
               lambda: signal.pidfd_send_signal(os.pidfd_open(EVALUATOR_PID), signal.SIGKILL),
               lambda: os.kill(EVALUATOR_PID, signal.SIGKILL),
               lambda: os.killpg(os.getpgid(EVALUATOR_PID), signal.SIGKILL),
               lambda: os.kill(-1, signal.SIGKILL),
               lambda: __import__("subprocess").run(["kill", "-9", "EVALUATOR_PID"])):
    try:
        attack()
    except Exception:
        pass
import tempfile
import time
time.sleep(0.5)
"""


@pytest.mark.skipif(not isolation(True).pid_namespace, reason="no PID namespace here")
@pytest.mark.parametrize("mode", ["hook", "bypass"])
def test_evaluator_survives_kill_attacks_and_leaves_no_temp_folders(tmp_path, mode):
    (tmp_path / "killer.py").write_text(_KILLER)
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _EVALUATOR, str(tmp_path / "killer.py"), mode], env=env, capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "result " in done.stdout
    assert list(temp.iterdir()) == []


@pytest.mark.parametrize("mode", ["hook", "no-death-signal"])
def test_sandbox_dies_with_the_evaluator(tmp_path, mode):
    if mode == "hook" and not isolation(True).parent_death_signal:
        pytest.skip("no setpriv --pdeathsig here")
    # the program's folder is private to it: it announces itself on its output (a file outside),
    # and its working folder's name marks it in the host's /proc
    (tmp_path / "sleeper.py").write_text("import os, time\nos.mkdir('sleeper-5678.5')\nos.chdir('sleeper-5678.5')\n"
                                         "print('started', flush=True)\ntime.sleep(60)\n")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(REPO)}
    cgroups = set(Path("/sys/fs/cgroup").glob("*/moeprune-exec-*"))
    evaluator = subprocess.Popen([sys.executable, "-c", _EVALUATOR, str(tmp_path / "sleeper.py"), mode],
                                 env=env, cwd=REPO)
    deadline = time.monotonic() + 60  # the program itself runs: every launcher is past its set-up
    started = lambda: any(b"started" in p.read_bytes() for p in temp.glob("*/plain.log"))  # noqa: E731
    while not started() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert started(), "the sandbox never started"
    assert _processes_mentioning(str(temp)) != [] and _processes_mentioning("sleeper-5678.5") != []
    evaluator.send_signal(signal.SIGKILL)
    evaluator.wait()
    deadline = time.monotonic() + 10
    while (_processes_mentioning(str(temp)) or _processes_mentioning("sleeper-5678.5")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(temp)) == [] and _processes_mentioning("sleeper-5678.5") == []
    for cgroup in Path("/sys/fs/cgroup").glob("*/moeprune-exec-*"):  # a killed evaluator leaves them
        if cgroup not in cgroups:
            cgroup.rmdir()


def test_temp_folder_is_removed_even_when_the_program_locks_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code = "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0)\nos.chmod('a', 0)\n"
    assert run_python(code).passed
    assert run_python("import time\ntime.sleep(30)\n", timeout=0.5).status == "timeout"
    assert [p for p in tmp_path.iterdir() if p.name.startswith("moeprune-exec-")] == []


@pytest.mark.skipif(not isolation(True).network_namespace, reason="no network namespace here")
def test_network_namespace_holds_past_the_audit_hook(tmp_path, monkeypatch):
    _no_hook(monkeypatch)
    import socket

    if [n for _, n in socket.if_nameindex()] == ["lo"]:
        pytest.skip("this machine has no interface but loopback, so there is nothing to hide")
    code = "import socket\nnames = [n for _, n in socket.if_nameindex()]\nassert names == ['lo'], names\n"
    assert run_python(code).passed


def test_reading_proc_self_mem_is_refused():
    result = run_python("open('/proc/self/mem', 'rb')\n")  # the sandbox has no /proc at all
    assert result.status == "failed" and "FileNotFoundError" in result.detail


def test_process_limit_per_isolation():
    from moeprune.evaluate.sandbox_os import Isolation, process_limit

    assert process_limit(Isolation((), True, True, False, False), 16) == 16  # counted per namespace
    # as root the sandbox runs as uid 65534, shared by every sandbox: the pids cgroup bounds it instead
    assert process_limit(Isolation((), True, False, False, False), 16) == 0
