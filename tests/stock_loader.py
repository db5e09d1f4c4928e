"""Child process for round-trip tests: loads checkpoints with stock transformers only.

Usage: python stock_loader.py JOBS.json — each job {"model_dir", "input_ids", "out"}; writes the
model's state dict, logits and a greedy generation to `out` (safetensors). Never imports moeprune.
"""

import json
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
        model.eval()
        ids = torch.tensor(job["input_ids"])
        with torch.no_grad():
            logits = model(ids).logits
            gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        tensors = {f"param.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        tensors["logits"] = logits.contiguous()
        tensors["generated"] = gen.contiguous()
        save_file(tensors, job["out"])
    assert "moeprune" not in sys.modules, "the stock loader must not import moeprune"
    print("stock-loader-ok", len(jobs))


if __name__ == "__main__":
    main()
