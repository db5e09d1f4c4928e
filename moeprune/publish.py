"""Model card and upload of a moeprune output folder.

`write_model_card(out_dir)` (re)writes `OUT/README.md` from `OUT/report.json` (from `moeprune run`)
and `OUT/moeprune.json` (every command writes it), rendering only what exists.
`publish_folder` also pushes the folder with `huggingface_hub` when asked and a token is available.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from moeprune import __version__
from moeprune.errors import MoePruneError
from moeprune.units import human_bytes

__all__ = ["FolderFacts", "read_facts", "render_card", "write_model_card", "ensure_provenance", "publish_folder",
           "PublishOutcome", "portable", "portable_path"]

REPORT_FILE = "report.json"
PROVENANCE_FILE = "moeprune.json"
CARD_FILE = "README.md"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# report.compression keys copied into moeprune.json when a folder's provenance lacks them
_PROVENANCE_FROM_REPORT = ("method", "ratio", "keep", "allocation", "kept", "dropped", "protected", "never_routed")


@dataclass
class FolderFacts:
    """The two JSON files of an output folder (empty dicts where absent)."""

    folder: Path
    report: dict
    provenance: dict

    @property
    def compression(self) -> dict:
        return self.report.get("compression", {})

    def first(self, *paths: str, default=None):
        """The first value found at a dotted path in the report, then in the provenance."""
        for source in (self.report, self.provenance):
            for path in paths:
                value = source
                for part in path.split("."):
                    value = value.get(part) if isinstance(value, dict) else None
                if value is not None:
                    return value
        return default


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MoePruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return data if isinstance(data, dict) else {}


def read_facts(out_dir: str | Path) -> FolderFacts:
    folder = Path(out_dir).expanduser()
    if not folder.is_dir():
        raise MoePruneError(f"{folder} is not a folder; pass a moeprune output folder")
    if not (folder / "config.json").is_file():
        raise MoePruneError(f"{folder} has no config.json; pass the output folder of a moeprune command")
    facts = FolderFacts(folder, _read_json(folder / REPORT_FILE), _read_json(folder / PROVENANCE_FILE))
    if not facts.report and not facts.provenance:
        raise MoePruneError(f"{folder} has neither {REPORT_FILE} nor {PROVENANCE_FILE}; it was not written by moeprune")
    return facts


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _compression_section(f: FolderFacts) -> list[str]:
    c = f.compression
    rows = [["method", f.first("compression.method", "method")],
            ["ratio (experts dropped per layer)", f.first("compression.ratio", "ratio")],
            ["experts kept per layer", f.first("compression.keep", "keep")],
            ["experts per layer before → after",
             f"{c['experts_before']} → {c['experts_after']}" if "experts_before" in c else None],
            ["allocation", f.first("compression.allocation", "allocation")],
            ["parameters before → after",
             f"{c['params_before']:,} → {c['params_after']:,}" if "params_before" in c else None],
            ["weight bytes before → after",
             f"{human_bytes(c['bytes_before'])} → {human_bytes(c['bytes_after'])}" if "bytes_before" in c else None],
            ["routed-expert bytes before → after",
             f"{human_bytes(c['expert_bytes_before'])} → {human_bytes(c['expert_bytes_after'])}"
             if "expert_bytes_before" in c else None],
            ["safetensors on disk", human_bytes(sum(p.stat().st_size for p in f.folder.glob("*.safetensors")))]]
    return ["## Compression", ""] + _table(["", "value"], [r for r in rows if r[1] is not None]) + [""]


def _quantization_section(f: FolderFacts) -> list[str]:
    q = f.provenance.get("quantization")
    if not q:
        return []
    from moeprune.compress.quant_format import serving_note

    group = "one scale per output row (channel)" if q.get("strategy") == "channel" else q.get("group_size")
    rows = [["format", q.get("format")], ["bits", q.get("bits")], ["group size", group],
            ["serves in", serving_note(q) if q.get("format") else None],
            ["bits per MoE layer", ", ".join(f"{k}: {v}" for k, v in (q.get("layer_bits") or {}).items()) or None],
            ["weight bytes before → after (estimate)",
             f"{human_bytes(q.get('bytes_before'))} → {human_bytes(q.get('bytes_after'))}"]]
    return ["## Quantization", ""] + _table(["", "value"], rows) + [""]


def _experts_section(f: FolderFacts) -> list[str]:
    kept = f.first("compression.kept", "kept") or {}
    if not isinstance(kept, dict) or not kept:
        return []
    rows = []
    for layer, experts in sorted(kept.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
        shown = ", ".join(map(str, experts[:16])) + (" …" if len(experts) > 16 else "")
        rows.append([layer, len(experts), shown])
    return ["## Kept experts per layer", "", "Original expert indices; kept experts are renumbered 0..n−1 in "
            "this order. The full mapping (and merges, scores) is in `moeprune.json`.", ""] \
        + _table(["layer", "kept", "experts"], rows) + [""]


def _eval_section(f: FolderFacts) -> list[str]:
    ev = f.report.get("eval") or {}
    base, comp, kept = ev.get("base") or {}, ev.get("compressed") or {}, ev.get("retained") or {}
    tasks = sorted(set(base) | set(comp))
    if not tasks:
        return []
    rows = []
    for task in tasks:
        b, c = base.get(task, {}), comp.get(task, {})
        rows.append([task, b.get("metric") or c.get("metric"), b.get("score"), c.get("score"), kept.get(task),
                     c.get("n") or b.get("n")])
    return ["## Evaluation (before / after)", ""] \
        + _table(["task", "metric", "base", "compressed", "retained", "n"], rows) + [""]


def _calibration_section(f: FolderFacts) -> list[str]:
    cal = f.report.get("calibration") or f.provenance.get("calibration")
    if not cal:
        return []
    return ["## Calibration data", "", "```json", json.dumps(portable(cal, f.folder), indent=2, sort_keys=True),
            "```", ""]


def _recipe_section(f: FolderFacts) -> list[str]:
    recipe = f.first("recipe")
    if not recipe:
        return []
    return ["## Recipe", "", "```json", json.dumps(portable(recipe, f.folder), indent=2, sort_keys=True), "```", ""]


_ABS_PATH = re.compile(r"(?<![\w.~])/[^\s:,;'\"()\[\]{}`]+")


def portable_path(path: str, folder: Path) -> str:
    """A local absolute path as a published card shows it: relative to the output folder when inside it,
    `demo` for the shipped demo model, else the last part of the path (the base model's folder name)."""
    from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR

    p = Path(path)
    for root, name in ((Path(folder).resolve(), "."), (DEMO_MODEL_DIR.resolve(), "demo")):
        try:
            rel = p.resolve().relative_to(root)
        except (ValueError, OSError):
            continue
        return name if str(rel) == "." else (str(rel) if name == "." else f"{name}/{rel}")
    return p.name or path


def portable(value, folder: Path):
    """`value` (JSON data) with every absolute local path in its strings made portable (`portable_path`)."""
    if isinstance(value, str):
        return _ABS_PATH.sub(lambda m: portable_path(m.group(0), folder), value)
    if isinstance(value, dict):
        return {k: portable(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, folder) for v in value]
    return value


def render_card(facts: FolderFacts):
    """The `huggingface_hub.ModelCard` of a folder: YAML metadata plus the sections that have data."""
    from huggingface_hub import ModelCard, ModelCardData

    base = portable(str(facts.first("model.path", "base_model", default="") or ""), facts.folder)
    version = facts.first("moeprune_version", default=__version__)
    method = facts.first("compression.method", "method")
    tags = ["moe", "moeprune"] + (["pruned"] if facts.first("compression.kept", "kept") else []) \
        + (["quantized"] if facts.provenance.get("quantization") else [])
    data = ModelCardData(library_name="transformers", tags=tags,
                         base_model=base if _HUB_ID.match(base) and not Path(base).exists() else None)
    lines = [f"# {facts.folder.resolve().name}", "",
             f"Compressed from `{base or 'unknown base model'}` with moeprune {version}"
             + (f" (method `{method}`)." if method else "."), "",
             "Loads with stock `transformers`: `AutoModelForCausalLM.from_pretrained(path)`.", ""]
    for section in (_compression_section, _quantization_section, _experts_section, _eval_section,
                    _calibration_section, _recipe_section):
        lines += section(facts)
    lines += ["## Provenance", "", f"`moeprune.json` holds the full record (moeprune {version})"
              + (" and `report.json` the run report." if facts.report else "."), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def ensure_provenance(out_dir: str | Path) -> Path:
    """Make `moeprune.json` hold the full provenance: add (never drop) fields known from `report.json`."""
    facts = read_facts(out_dir)
    record = dict(facts.provenance)
    record.setdefault("moeprune_version", facts.report.get("moeprune_version", __version__))
    if facts.report:
        record.setdefault("base_model", facts.first("model.path"))
        for key in _PROVENANCE_FROM_REPORT:
            if key not in record and key in facts.compression:
                record[key] = facts.compression[key]
        for key in ("recipe", "calibration"):
            if key not in record and key in facts.report:
                record[key] = facts.report[key]
    record = portable(record, facts.folder)  # a published file never holds an absolute local path
    path = facts.folder / PROVENANCE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def write_model_card(out_dir: str | Path) -> Path:
    """(Re)write `OUT/README.md` from the folder's report and provenance; returns its path."""
    facts = read_facts(out_dir)
    path = facts.folder / CARD_FILE
    render_card(facts).save(path)
    return path


@dataclass
class PublishOutcome:
    """What `publish_folder` did: `pushed` is False when no push was asked for or no token exists."""

    folder: Path
    card: Path
    pushed: bool
    message: str
    url: str | None = None


def publish_folder(out_dir: str | Path, *, repo_id: str | None = None, private: bool = False,
                   token: str | None = None, api=None) -> PublishOutcome:
    """Rewrite the card and `moeprune.json`, then push to `repo_id` when given and a token exists.

    No token: nothing is pushed and the outcome says so (the folder is left ready). A push that fails
    (network, permissions, bad repo id) raises a one-line `MoePruneError`.
    """
    ensure_provenance(out_dir)
    card = write_model_card(out_dir)
    folder = card.parent.resolve()
    if repo_id is None:
        return PublishOutcome(folder, card, False, f"model card and moeprune.json written in {folder}")
    if not _HUB_ID.match(repo_id):
        raise MoePruneError(f"--repo-id {repo_id!r} is not of the form owner/name")
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        return PublishOutcome(folder, card, False, f"no Hugging Face token found (set HF_TOKEN or run `hf auth "
                                                   f"login`); nothing pushed, {folder} is ready to upload")
    api = api or HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                          commit_message=f"Upload model compressed with moeprune {__version__}")
    except Exception as exc:  # network, auth and hub errors all become one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MoePruneError(f"push to {repo_id} failed: {first}") from exc
    return PublishOutcome(folder, card, True, f"pushed {folder} to {repo_id}", url=str(url))
