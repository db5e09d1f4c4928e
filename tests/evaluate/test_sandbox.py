"""The code-execution sandbox: generated code runs in a restricted child process."""

from __future__ import annotations

import time

import pytest

from moeprune.evaluate.sandbox import run_python
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


def test_program_is_prompt_completion_test_and_check():
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
    target = tmp_path / "escaped.txt"
    result = run_python(f"open({str(target)!r}, 'w').write('x')\n")
    assert result.status == "failed" and "PermissionError" in result.detail
    assert not target.exists()


@pytest.mark.parametrize("code", [
    "import os\nos.remove('/etc/hostname')\n",
    "import os\nos.rename('/etc/hostname', 'x')\n",
    "import shutil\nshutil.rmtree('/tmp/definitely-not-here')\n",
    "import os\nos.open('/tmp/sandbox-escape', os.O_WRONLY | os.O_CREAT)\n",
])
def test_destructive_calls_outside_the_temp_dir_are_refused(code):
    result = run_python(code)
    assert result.status == "failed" and "PermissionError" in result.detail


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
