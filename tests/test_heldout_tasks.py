"""scripts/heldout_tasks.py: tasks on held-out demo-corpus rows the shipped tasks do not use, scored
exactly like the shipped ones."""

import importlib.util
import sys
from pathlib import Path

import pytest

from moeprune.evaluate.tasks import resolve_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def heldout_tasks():
    sys.path.insert(0, str(ROOT / "scripts"))  # it imports build_corpus
    try:
        spec = importlib.util.spec_from_file_location("heldout_tasks", ROOT / "scripts" / "heldout_tasks.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_rows_after_the_shipped_ones_with_the_shipped_scoring(heldout_tasks, tmp_path):
    assert heldout_tasks.main(["--start", "195", "--stop", "215", "-o", str(tmp_path)]) == 0
    for d in ("arith", "json", "program"):
        fresh, shipped = resolve_task(str(tmp_path / f"fresh_{d}.yaml")), resolve_task(f"demo_{d}")
        assert len(fresh.rows) == 20 and fresh.name == f"fresh_{d}"
        assert list(fresh.rows[:5]) == list(shipped.rows[195:200])  # the split continues where the shipped rows stop
        assert not {r["prompt"] for r in fresh.rows[5:]} & {r["prompt"] for r in shipped.rows}
        assert type(fresh.scorer) is type(shipped.scorer) and fresh.config.generation == shipped.config.generation
        assert [f.__name__ for f in fresh.filters] == [f.__name__ for f in shipped.filters]


def test_out_of_range_rows_are_refused(heldout_tasks, tmp_path):
    with pytest.raises(SystemExit, match="Error: --start/--stop"):
        heldout_tasks.main(["--start", "10", "--stop", "5", "-o", str(tmp_path)])
