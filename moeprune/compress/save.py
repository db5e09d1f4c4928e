"""Write a compressed model as a stock Hugging Face checkpoint, atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

from moeprune import __version__
from moeprune.io import TOKENIZER_FILES, atomic_output_dir
from moeprune import strict_json

__all__ = ["save_compressed", "write_checkpoint", "PROVENANCE_FILE"]

PROVENANCE_FILE = "moeprune.json"


def save_compressed(model: nn.Module, out_dir: str | Path, *, source_dir: str | Path | None = None,
                    provenance: dict | None = None, overwrite: bool = False,
                    max_shard_size: str = "5GB") -> Path:
    """Save `model` with `save_pretrained` (hub per-expert format) into `out_dir`, atomically.

    Tokenizer files and the generation config are copied from `source_dir` when present there (the
    source folder is only read). `provenance` is written as `moeprune.json` beside the weights.
    """
    inputs = (source_dir,) if source_dir is not None else ()
    with atomic_output_dir(out_dir, inputs=inputs, overwrite=overwrite) as tmp:
        write_checkpoint(model, tmp, source_dir=source_dir, provenance=provenance, max_shard_size=max_shard_size)
    return Path(out_dir).expanduser().resolve()


def write_checkpoint(model: nn.Module, folder: Path, *, source_dir: str | Path | None = None,
                     provenance: dict | None = None, max_shard_size: str = "5GB") -> None:
    """Write weights, config, tokenizer/generation files and `moeprune.json` into an existing folder."""
    folder = Path(folder)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if source_dir is not None:
        src = Path(source_dir)
        for name in (*TOKENIZER_FILES, "generation_config.json"):
            if (src / name).is_file() and not (folder / name).exists():
                shutil.copy2(src / name, folder / name)
    record = {"moeprune_version": __version__, **(provenance or {})}
    (folder / PROVENANCE_FILE).write_text(strict_json.dumps(record, indent=2, sort_keys=False) + "\n")
