"""Re-export a Qwen2-MoE folder with its routed experts padded with always-zero neurons.

    python scripts/pad_demo_experts.py SRC_DIR OUT_DIR [--width 128]

Every routed expert i of every layer gets `width - moe_intermediate_size` extra neurons: zero rows at the
end of `experts.i.gate_proj.weight` and `experts.i.up_proj.weight`, zero columns at the end of
`experts.i.down_proj.weight`; `moe_intermediate_size` becomes `width`. A zero neuron contributes
down[:, j] * silu(gate[j] . x) * (up[j] . x) = 0 * silu(0) * 0 = 0, so the network computes the same
function (up to floating-point summation order); routers, shared experts and everything else are copied
bit for bit, so routing is unchanged.

Why: the demo was trained with 112-wide experts. 112 is divisible by none of the group sizes 128/64/32
that int4 MoE kernels take, and vLLM's CPU int4 MoE kernel tiles the expert width by 32; at width 128
`quantize --bits 4` picks group 128 by default and the output serves in vLLM CPU (docs/serving.md).

The source folder is only read. OUT_DIR must not exist (or be empty); it is written in a temporary
folder beside it and renamed into place, so an interrupted run leaves no half-written model. The other
files of SRC_DIR (tokenizer, card, scores) are copied unchanged. Deterministic: same input, same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def pad_tensor(name: str, tensor: torch.Tensor, width: int) -> torch.Tensor:
    """gate/up (I, H) -> (width, H) with zero rows; down (H, I) -> (H, width) with zero columns."""
    kind = EXPERT_KEY.search(name).group(1)
    dim = 1 if kind == "down_proj" else 0
    extra = width - tensor.shape[dim]
    if extra < 0:
        raise ValueError(f"{name} is {tensor.shape[dim]} wide, more than --width {width}")
    shape = list(tensor.shape)
    shape[dim] = extra
    return torch.cat([tensor, torch.zeros(shape, dtype=tensor.dtype)], dim=dim).contiguous()


def pad_folder(src: Path, out: Path, width: int) -> dict:
    """Write the padded copy of `src` to `out` (which must not exist); returns counts for the log."""
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "qwen2_moe":
        raise ValueError(f"{src}/config.json: model_type {config.get('model_type')!r}, expected 'qwen2_moe'")
    old = int(config["moe_intermediate_size"])
    if width < old or width % 32:
        raise ValueError(f"--width {width} must be a multiple of 32 and at least moe_intermediate_size {old}")
    weights = src / "model.safetensors"
    tensors, padded = {}, 0
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            if EXPERT_KEY.search(name):
                t, padded = pad_tensor(name, t, width), padded + 1
            tensors[name] = t
    if not padded:
        raise ValueError(f"{weights}: no per-expert gate_proj/up_proj/down_proj weights found")
    config["moe_intermediate_size"] = width
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for item in sorted(src.iterdir()):
            if item.is_file() and item.name not in ("model.safetensors", "config.json"):
                shutil.copy2(item, tmp / item.name)
        save_file(tensors, tmp / "model.safetensors", metadata=metadata)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)  # readable by others, like the source folder (mkdtemp makes it private)
        for item in tmp.iterdir():
            os.chmod(item, 0o644)
        if out.exists():
            out.rmdir()  # only an empty folder (rmdir refuses otherwise)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"tensors_padded": padded, "from": old, "to": width}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="Qwen2-MoE folder with per-expert weights (model.safetensors)")
    p.add_argument("out", type=Path, help="new folder (must not exist, or be empty)")
    p.add_argument("--width", type=int, default=128, help="new routed-expert width (a multiple of 32)")
    args = p.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"Error: {args.out} exists and is not an empty folder; choose a new output folder", file=sys.stderr)
        return 2
    try:
        done = pad_folder(args.src, args.out, args.width)
    except (ValueError, OSError, KeyError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(f"padded {done['tensors_padded']} expert tensors from width {done['from']} to {done['to']}: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
