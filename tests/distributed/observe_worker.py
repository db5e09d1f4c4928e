"""Run under torchrun: observe a saved tiny model with both observers; rank 0 saves the observations.

usage: torchrun --standalone --nproc-per-node N observe_worker.py MODEL_DIR OUT_DIR
Without torchrun it is one process and computes the reference."""

import sys
from pathlib import Path

import torch

from moeprune import distributed
from moeprune.checkpoint.model_dir import load_model
from moeprune.observe import observe
from moeprune.execution.layers import observe_layerwise

COLLECT = ("routed_means", "all_means", "router_gram")


def batches():
    """Five batches (an odd number: the ranks' shares differ in size) with right padding."""
    g = torch.Generator().manual_seed(3)
    out = []
    for b in range(5):
        ids = torch.randint(3, 128, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 4 + b:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def main(model_dir: str, out_dir: str) -> None:
    ctx = distributed.context()
    model = load_model(model_dir, device="cpu")
    mem = observe(model, batches(), collect=COLLECT, progress=False)
    lw = observe_layerwise(model_dir, batches(), collect=COLLECT, device="cpu", progress=False)
    if ctx.is_main:
        mem.save(Path(out_dir) / "memory")
        lw.save(Path(out_dir) / "layerwise")
    distributed.finish(wait=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
