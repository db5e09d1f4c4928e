"""No command deletes, truncates or replaces a file it did not write, whatever -o and --overwrite say;
links out of a model folder are refused; interrupted runs leave no temporary folder behind."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR
from moeprune.cli import _register_commands, cli

_register_commands()

KEEP = {str(i): list(range(8)) for i in range(4)}  # the demo: 4 MoE layers of 16 experts


def _digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or `path` itself) -> its sha256: what must survive a refused command."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _invoke(args):
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture()
def inputs(tmp_path):
    """One file or folder of every kind a command reads, each in a folder of its own."""
    made = {}
    for kind in ("keep", "observations", "recipe", "calibration", "task"):
        (tmp_path / kind).mkdir()
    made["keep"] = tmp_path / "keep" / "keep.json"
    made["keep"].write_text(json.dumps(KEEP))
    made["observations"] = tmp_path / "observations" / "obs"
    made["observations"].mkdir()
    (made["observations"] / "observations.json").write_text("{}")
    made["calibration"] = tmp_path / "calibration" / "calib.jsonl"
    made["calibration"].write_text("".join(json.dumps({"text": f"row {i} of calibration text"}) + "\n"
                                           for i in range(8)))
    made["task"] = tmp_path / "task" / "qa.yaml"
    (tmp_path / "task" / "qa.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    made["task"].write_text("name: qa\ndata: qa.jsonl\nscorer: numeric_match\n")
    made["recipe"] = tmp_path / "recipe" / "r.yaml"
    made["recipe"].write_text(f"model: demo\nmethod: frequency\nratio: 0.5\n"
                              f"calibration: {{spec: '{made['calibration']}'}}\n"
                              f"eval: {{tasks: ['{made['task']}'], limit: 1}}\n")
    return made


def _command(kind: str, inputs: dict, out: Path) -> list[str]:
    """A command that reads the input of `kind`, writing to `out`."""
    if kind == "keep":
        return ["prune", "demo", "--keep", str(inputs["keep"]), "-o", str(out)]
    if kind == "observations":
        return ["prune", "demo", "--method", "frequency", "--ratio", "0.5", "--observations",
                str(inputs["observations"]), "-o", str(out)]
    if kind == "calibration":
        return ["observe", "demo", "--calib", str(inputs["calibration"]), "-o", str(out)]
    return ["run", str(inputs["recipe"]), "-o", str(out)]  # recipe and task: both read by `run`


@pytest.mark.parametrize("kind", ["keep", "observations", "recipe", "calibration", "task"])
@pytest.mark.parametrize("where", ["equal", "parent", "inside"])
def test_output_that_is_holds_or_sits_in_an_input_is_refused(inputs, kind, where):
    target = inputs[kind]
    before = _digest(target.parent)
    out = {"equal": target, "parent": target.parent, "inside": target / "out"}[where]
    code, output = _invoke([*_command(kind, inputs, out), "--overwrite"])
    assert code == 2, output
    assert output.startswith("Error: ") and len(output.strip().splitlines()) == 1, output
    assert _digest(target.parent) == before  # nothing deleted, truncated or replaced


def test_the_model_folder_is_refused_as_output_too(tmp_path):
    code, output = _invoke(["prune", "demo", "--keep", str(tmp_path / "k.json"), "-o", str(DEMO_MODEL_DIR / "x")])
    assert code == 2 and "inside the input folder" in output


def test_overwrite_replaces_only_moeprunes_own_outputs(tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(KEEP))
    out = tmp_path / "out"
    code, output = _invoke(["prune", "demo", "--keep", str(keep), "-o", str(out)])
    assert code == 0, output
    code, output = _invoke(["prune", "demo", "--keep", str(keep), "-o", str(out), "--overwrite"])
    assert code == 0, output  # a previous moeprune output is replaced
    (out / "notes.txt").write_text("mine")
    code, output = _invoke(["prune", "demo", "--keep", str(keep), "-o", str(out), "--overwrite"])
    assert code == 2 and "notes.txt, which moeprune did not write" in output
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_eval_report_path_never_replaces_a_file_it_did_not_write(tmp_path, inputs):
    mine = tmp_path / "mine.json"
    mine.write_text('{"my": "data"}')
    args = ["eval", "demo", "--tasks", str(inputs["task"]), "--limit", "1"]
    code, output = _invoke([*args, "-o", str(mine)])
    assert code == 2 and "exists; choose a new file name or pass --overwrite" in output
    code, output = _invoke([*args, "-o", str(mine), "--overwrite"])
    assert code == 2 and "not a report moeprune wrote" in output
    assert mine.read_text() == '{"my": "data"}'
    for target in (inputs["task"], inputs["task"].with_suffix(".jsonl"), DEMO_MODEL_DIR / "config.json"):
        before = target.read_bytes()
        code, output = _invoke([*args, "-o", str(target), "--overwrite"])
        assert code == 2 and output.startswith("Error: ") and len(output.strip().splitlines()) == 1, output
        assert target.read_bytes() == before
    report = tmp_path / "report.json"
    assert _invoke([*args, "-o", str(report)])[0] == 0
    assert _invoke([*args, "-o", str(report), "--overwrite"])[0] == 0  # its own report: replaced
    assert json.loads(report.read_text())["moeprune_version"]


def _model_copy(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    for f in DEMO_MODEL_DIR.iterdir():
        if f.is_file():
            (src / f.name).write_bytes(f.read_bytes())
    return src


def test_a_link_out_of_the_model_folder_is_refused_and_never_copied(tmp_path):
    src = _model_copy(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    (src / "tokenizer_config.json").unlink()
    (src / "tokenizer_config.json").symlink_to(secret)
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(KEEP))
    for args in (["inspect", str(src)], ["prune", str(src), "--keep", str(keep), "-o", str(tmp_path / "out")]):
        code, output = _invoke(args)
        assert code == 2 and "tokenizer_config.json is a symbolic link to" in output and "outside" in output, output
    assert not (tmp_path / "out").exists()


def test_links_inside_the_folder_and_into_the_hub_cache_are_read(tmp_path):
    repo = tmp_path / "hub" / "models--org--demo"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in DEMO_MODEL_DIR.iterdir():
        if f.is_file():
            blob = repo / "blobs" / hashlib.sha256(f.name.encode()).hexdigest()
            blob.write_bytes(f.read_bytes())
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    code, output = _invoke(["inspect", str(snap)])
    assert code == 0, output


def test_publish_refuses_a_folder_with_a_link_out(tmp_path):
    folder = tmp_path / "pub"
    folder.mkdir()
    (folder / "moeprune.json").write_text("{}")
    (folder / "notes").symlink_to("/etc/hostname")
    code, output = _invoke(["publish", str(folder)])
    assert code == 2 and "symbolic link" in output


# the writer starts as from a terminal: a suite launched with nohup or as a background job hands its children
# SIGHUP / SIGINT ignored, and an ignored signal is one the CLI rightly leaves ignored
_WRITER = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from moeprune.cli import _handle_termination
    from moeprune.checkpoint.writer import OutputFolder
    _handle_termination()
    with OutputFolder(sys.argv[1]) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        print("writing", flush=True)
        time.sleep(60)
""")


def _start_writer(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_an_interrupted_run_removes_its_temporary_folder(tmp_path, signum):
    proc = _start_writer(tmp_path / "out")
    assert any(".out.tmp-" in n for n in _leftovers(tmp_path))
    proc.send_signal(signum)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert _leftovers(tmp_path) == []


def test_a_killed_run_leaves_nothing_complete_and_the_next_run_removes_it(tmp_path):
    proc = _start_writer(tmp_path / "out")
    proc.kill()
    proc.wait(timeout=30)
    stale = _leftovers(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-") and not (tmp_path / "out").exists()
    live = _start_writer(tmp_path / "out")  # a live run's folder is locked: never removed by another
    try:
        from moeprune.checkpoint.writer import OutputFolder

        with OutputFolder(tmp_path / "out") as tmp:
            (tmp / "config.json").write_text("{}")
        names = _leftovers(tmp_path)
        assert stale[0] not in names and "out" in names
        assert sum(n.startswith(".out.tmp-") for n in names) == 1  # the live writer's
    finally:
        live.kill()
        live.wait(timeout=30)


def test_a_replacement_cut_between_its_renames_is_put_back(tmp_path):
    from moeprune.checkpoint.writer import remove_stale

    old = tmp_path / ".out.old-999999999"  # a pid no process has
    old.mkdir()
    (old / "moeprune.json").write_text("{}")
    remove_stale(tmp_path, "out")
    assert (tmp_path / "out" / "moeprune.json").is_file() and not old.exists()


@pytest.fixture()
def full_disk(tmp_path):
    """A 256 KiB file system, full (root only: mount needs it)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(full_disk, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(KEEP))
    cases = [
        ["observe", "demo", "--calib", "code:2", "--max-length", "32", "-o", str(full_disk / "obs")],
        ["prune", "demo", "--keep", str(keep), "-o", str(full_disk / "pruned")],
        ["quantize", "demo", "--bits", "8", "-o", str(full_disk / "q")],
        ["eval", "demo", "--tasks", "demo_arith", "--limit", "1", "-o", str(full_disk / "report.json")],
    ]
    for args in cases:
        code, output = _invoke(args)
        assert code == 2, output
        assert "No space left on device" in output and "free some space or choose another -o" in output, output
        assert _leftovers(full_disk) == ["filler"]
