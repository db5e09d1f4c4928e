"""Reading model folders: which folder a model argument names (the shipped `demo` / `study` models), its
config, the model on the meta device, the loaded model and its tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from moeprune.errors import MoePruneError

__all__ = [
    "DEMO_MODEL_DIR",
    "resolve_model_dir",
    "load_model",
    "load_tokenizer",
    "load_config",
    "meta_model",
    "TOKENIZER_FILES",
    "check_links",
]

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo-moe"
# the models shipped inside the package, by the names the commands accept (MODEL_CARD.md in each)
SHIPPED_MODELS = {"demo": DEMO_MODEL_DIR, "study": DEMO_MODEL_DIR.parent / "study-moe"}

# Files that make up a tokenizer in a Hugging Face model folder (copied verbatim to outputs).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """Turn a user's model argument into a folder holding `config.json`.

    `demo` and `study` name the small MoEs shipped inside the package (SHIPPED_MODELS), unless the
    current folder has a model folder of that name (then that one is used, with a note on stderr).
    """
    path = Path(spec).expanduser()
    if str(spec) in SHIPPED_MODELS:
        if (path / "config.json").is_file():
            print(f"note: using the local folder {path.resolve()}, not the shipped {spec} model "
                  f"(pass ./{spec} to silence this, or another name for the shipped one)", file=sys.stderr)
        else:
            path = SHIPPED_MODELS[str(spec)]
    if not path.exists():
        raise MoePruneError(f"model folder {path} does not exist (pass a local model folder, or 'demo')")
    if not path.is_dir():
        raise MoePruneError(f"model path {path} is a file; pass the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise MoePruneError(f"{path} has no config.json; pass a Hugging Face model folder (or 'demo')")
    check_links(path.resolve())
    return path.resolve()


def _hub_cache_repo(folder: Path) -> Path | None:
    """`.../models--org--name` when `folder` is a snapshot of the Hugging Face cache (whose files are links
    into that repository's `blobs/`), else None."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return None


def check_links(folder: Path, *, what: str = "model folder") -> None:
    """Refuse symbolic links that lead out of `folder` (into the cache's `blobs/` is fine for a snapshot of
    the Hugging Face cache): moeprune reads and copies what a folder holds, never what a link points at."""
    folder = Path(folder).resolve()
    allowed = [folder]
    repo = _hub_cache_repo(folder)
    if repo is not None:
        allowed.append(repo / "blobs")
    for root, dirs, files in os.walk(folder):
        for name in sorted(files) + sorted(dirs):
            entry = Path(root) / name
            if not entry.is_symlink():
                continue
            target = entry.resolve()
            if not any(target == a or a in target.parents for a in allowed):
                raise MoePruneError(f"{what} {folder}: {entry.relative_to(folder)} is a symbolic link to {target}, "
                                    "outside the folder; moeprune never follows links out of a folder it reads, so "
                                    "copy that file into the folder")


def load_model(spec: str | os.PathLike, *, dtype: str = "float32", device: str | None = None,
               trust_remote_code: bool = False):
    """Load a causal LM from a local folder with stock transformers (never from a hub)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moeprune.checks import check_config_file, check_finite, check_weight_files

    path = resolve_model_dir(spec)
    check_config_file(path)
    check_weight_files(path)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoePruneError(f"cannot load a causal LM from {path}: {first}") from exc
    check_finite(model.state_dict().items(), where=str(path))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    return model


def load_config(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """Read a model folder's config with a one-line error naming the file."""
    from transformers import AutoConfig

    from moeprune.checks import check_config_file

    path = resolve_model_dir(spec)
    check_config_file(path)
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoePruneError(f"{path / 'config.json'}: cannot read the config ({first})") from exc


def meta_model(spec: str | os.PathLike):
    """The model built from its config on the meta device: every module and shape, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    from moeprune.models import get_arch_spec

    get_arch_spec(config)  # one-line error for unsupported and non-MoE models
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """Load the tokenizer stored beside a model; a clear error if there is none."""
    from transformers import AutoTokenizer

    path = resolve_model_dir(spec)
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise MoePruneError(f"{path} has no tokenizer files (expected e.g. tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # a damaged tokenizer.json raises JSON, tokenizers or OS errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoePruneError(f"{path}: cannot load the tokenizer ({type(exc).__name__}: {first}); "
                            "check or replace tokenizer.json / tokenizer_config.json") from None
