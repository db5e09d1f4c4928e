"""Greedy generation in vLLM for scripts/check_vllm.py; runs inside the vLLM environment (imports only vLLM).

    $MOEPRUNE_VLLM_PYTHON scripts/vllm_generate.py JOBS.json RESULTS.json

JOBS.json: {"max_tokens": 16, "jobs": [{"model": DIR, "dtype": "float32", "prompts": [[token ids], ...]}, ...]}.
RESULTS.json: one entry per job, in order: {"model", "tokens": [[ids], ...]} or {"model", "error": "..."}.
Prompts are token ids, so both engines see the same input whatever their tokenizer versions. Every job
gets its own `LLM` in this one process, its engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni"
executor): vLLM's import is paid once, not once per model and worker. A failed load leaves vLLM's global
state half set up, so the process stops at the first failure (exit status 3) after recording it; the caller
starts a fresh one for the jobs left. `LLM(...)` may spawn processes, hence `if __name__ == "__main__":`.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback


def _generate(job: dict, max_tokens: int) -> list[list[int]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"), enforce_eager=True, max_model_len=128,
              max_num_seqs=4, seed=0, trust_remote_code=False, generation_config="vllm",
              distributed_executor_backend="uni")
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()


def main(jobs_file: str, results_file: str) -> int:
    spec = json.loads(open(jobs_file, encoding="utf-8").read())
    results = []
    for job in spec["jobs"]:
        try:
            results.append({"model": job["model"], "tokens": _generate(job, spec["max_tokens"])})
        except Exception as exc:  # reported per model; the caller decides what a failure means
            last = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append({"model": job["model"], "error": last[:2000]})
            traceback.print_exc()
            print(f"vLLM failed on {job['model']}: {last}", file=sys.stderr)
        with open(results_file, "w", encoding="utf-8") as f:  # rewritten after every job: partial results survive
            json.dump(results, f)
        if "error" in results[-1]:
            return 3
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.exit(main(sys.argv[1], sys.argv[2]))
