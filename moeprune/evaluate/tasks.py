"""Finding tasks by name or path, and loading their JSONL rows.

Built-in tasks are the YAML files in ``moeprune/evaluate/tasks/``, registered in :data:`TASKS`
under their file stem. A task spec on the command line is a registered name, a path to a task
YAML, or a path to a bare JSONL file (scorer inferred from its fields, see :func:`config_for_jsonl`).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import ValidationError

from moeprune.errors import MoePruneError
from moeprune.inputs import check_file, not_utf8
from moeprune.evaluate.config import TaskConfig, data_file_location, load_task_config
from moeprune.evaluate.scorers import FILTERS, SCORERS, Scorer
from moeprune.registry import Registry

__all__ = ["Task", "TASKS", "BUILTIN_TASK_DIR", "resolve_task", "read_jsonl", "config_for_jsonl", "task_files"]

BUILTIN_TASK_DIR = Path(__file__).resolve().parent / "tasks"

TASKS: Registry[Path] = Registry("task", base=Path)
for _yaml in sorted(BUILTIN_TASK_DIR.glob("*.yaml")):
    if _yaml.stem.startswith("_"):  # shared bases for `include:`, not tasks themselves
        continue
    TASKS.register(_yaml.stem, _yaml)

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")
_YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Task:
    """A validated task: its config, the scorer and filters it names, and its data rows."""

    config: TaskConfig
    scorer: Scorer
    filters: tuple[Callable[[str], str], ...]
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def select(self, limit: int | None) -> list[dict]:
        """The first ``limit`` rows (all rows when ``limit`` is None): a deterministic subset."""
        return list(self.rows if limit is None else self.rows[:limit])

    def prompt_for(self, row: dict) -> str:
        return self.config.prompt_prefix + row["prompt"]

    def apply_filters(self, completion: str) -> str:
        for fn in self.filters:
            completion = fn(completion)
        return completion


def read_jsonl(path: Path, *, required: tuple[str, ...] = (), context: str = "") -> list[dict]:
    """Rows of a (optionally gzipped) JSONL file; each must be an object holding ``required`` fields."""
    where = f" ({context})" if context else ""
    if path.is_dir():
        raise MoePruneError(f"data file {path} is a folder, not a file{where}")
    if not path.is_file():
        raise MoePruneError(f"data file {path} does not exist{where}")
    opener = gzip.open if path.name.endswith(".gz") else open
    rows: list[dict] = []
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = fh.readlines()
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc, what="data file") from None
    except (OSError, EOFError) as exc:
        raise MoePruneError(f"cannot read data file {path}{where}: {exc}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MoePruneError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise MoePruneError(f"{path}:{lineno}: each line must be a JSON object")
        missing = [f for f in required if f not in row]
        if missing:
            raise MoePruneError(f"{path}:{lineno}: missing field {missing[0]!r}{where}")
        rows.append(row)
    if not rows:
        raise MoePruneError(f"data file {path} has no rows{where}")
    return rows


def config_for_jsonl(path: Path) -> TaskConfig:
    """A task for a bare JSONL file, chosen from the first row's fields.

    ``text`` -> perplexity; ``test`` + ``entry_point`` -> code_exec; ``prompt`` + ``answer`` ->
    exact_match on the first generated line (stop at a newline, 64 new tokens).
    """
    first = read_jsonl(path)[0]
    name = path.name.split(".")[0]
    common = {"name": name, "data": str(path), "source": str(path)}
    if "text" in first:
        return TaskConfig(**common, scorer="perplexity")
    if {"test", "entry_point", "prompt"} <= first.keys():
        return TaskConfig(**common, scorer="code_exec",
                          generation={"max_new_tokens": 512, "stop": ["\ndef ", "\nclass ", "\nif ", "\nprint("]})
    if {"prompt", "answer"} <= first.keys():
        return TaskConfig(**common, scorer="exact_match", filters=("first_line",),
                          generation={"max_new_tokens": 64, "stop": ["\n"]})
    raise MoePruneError(f"{path}: cannot tell the task kind from fields {sorted(first)}; expected 'text', "
                        "'prompt'+'answer' or 'prompt'+'test'+'entry_point' (or write a task YAML)")


def _build_scorer(config: TaskConfig) -> Scorer:
    if config.scorer.name not in SCORERS:
        raise MoePruneError(f"{config.source}: field 'scorer': unknown scorer {config.scorer.name!r}; "
                            f"available: {SCORERS.available()}")
    try:
        return SCORERS.get(config.scorer.name)(**config.scorer.options())
    except ValidationError as exc:
        err = exc.errors()[0]
        opt = ".".join(str(p) for p in err["loc"])
        raise MoePruneError(f"{config.source}: field 'scorer.{opt}': {err['msg']}") from None


def _build_filters(config: TaskConfig) -> tuple[Callable[[str], str], ...]:
    unknown = [f for f in config.filters if f not in FILTERS]
    if unknown:
        raise MoePruneError(f"{config.source}: field 'filters': unknown filter {unknown[0]!r}; "
                            f"available: {FILTERS.available()}")
    return tuple(FILTERS.get(f) for f in config.filters)


def task_from_config(config: TaskConfig) -> Task:
    """Check the scorer, filters and data of ``config`` and load its rows."""
    scorer = _build_scorer(config)
    filters = _build_filters(config)
    path = data_file_location(config.data)
    rows = read_jsonl(path, required=scorer.required_fields,
                      context=f"field 'data' of task {config.name!r} in {config.source}")
    return Task(config=config, scorer=scorer, filters=filters, rows=tuple(rows))


def resolve_task(spec: str) -> Task:
    """A registered task name, a task YAML path or a JSONL path -> a loaded :class:`Task`."""
    if spec in TASKS:
        return task_from_config(load_task_config(TASKS.get(spec)))
    path = Path(spec).expanduser()
    looks_like_path = spec.endswith(_YAML_SUFFIXES + _JSONL_SUFFIXES) or "/" in spec
    if not looks_like_path:
        raise MoePruneError(f"unknown task {spec!r}; available: {TASKS.available()} "
                            "(or pass a path to a task .yaml or .jsonl)")
    check_file(path, what="task file")
    if spec.endswith(_JSONL_SUFFIXES):
        return task_from_config(config_for_jsonl(path.resolve()))
    return task_from_config(load_task_config(path))


def task_files(tasks) -> list[Path]:
    """The files on disk that `tasks` were read from (their YAML and data files), for output checks."""
    from moeprune.evaluate.config import data_file_location

    out: list[Path] = []
    for task in tasks:
        config = getattr(task, "config", None)
        if config is None:
            continue
        if config.source:
            out.append(Path(config.source))
        try:
            out.append(data_file_location(config.data))
        except MoePruneError:
            pass
    return out
