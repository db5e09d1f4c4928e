"""`moeprune eval`: score a model folder on evaluation tasks and write a JSON report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from moeprune import __version__
from moeprune import strict_json
from moeprune.commands.pipeline_cmds import execution_options

__all__ = ["eval_command", "format_table", "write_report"]


def _split_tasks(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: task, metric, score (with its direction), n, seconds."""
    header = ("task", "metric", "score", "n", "seconds")
    rows = [
        (name, r["metric"], f"{r['score']:.4f} {'↑' if r['higher_is_better'] else '↓'}", str(r["n"]),
         f"{r['seconds']:.1f}")
        for name, r in results.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write_report(path: Path, report: dict[str, Any], *, inputs=(), overwrite: bool = False) -> Path:
    """Write ``report`` as strict JSON (NaN scores become null), atomically; see `write_file_atomically`."""
    from moeprune.checkpoint.writer import write_file_atomically

    return write_file_atomically(path, strict_json.dumps(report, indent=2) + "\n", inputs=inputs,
                                 overwrite=overwrite)


@click.command("eval")
@click.argument("model_dir")
@click.option("--tasks", "tasks", required=True,
              help="Comma-separated task names, task .yaml/.jsonl paths, or lm_eval:<task>.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N rows of each task.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="Write the JSON report here.")
@click.option("--samples/--no-samples", default=False, show_default=True,
              help="Include per-row prompts, completions and scores in the report.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing report that moeprune wrote at -o.")
@click.option("--backend", default="hf", show_default=True, type=click.Choice(["hf", "vllm", "auto"]),
              help="hf: transformers generate; vllm: vLLM's offline engine (installed beside moeprune); "
                   "auto: vLLM when it is installed and runs on --device.")
@execution_options
def eval_command(model_dir: str, tasks: str, limit: int | None, batch_size: int, output: Path | None,
                 dtype: str, device: str, execution: str, max_memory: str | None, samples: bool,
                 progress: bool, overwrite: bool, backend: str) -> None:
    """Evaluate MODEL_DIR (a Hugging Face model folder, or 'demo') on --tasks.

    Example: moeprune eval demo --tasks demo_arith,demo_prose --limit 50 -o report.json
    """
    from moeprune.checkpoint.writer import check_output_file
    from moeprune.evaluate import evaluate, resolve_tasks
    from moeprune.evaluate.tasks import task_files
    from moeprune.evaluate.vllm_backend import resolve_backend
    from moeprune.checkpoint.model_dir import load_model, load_tokenizer, resolve_model_dir

    start = time.perf_counter()
    model_path = resolve_model_dir(model_dir)
    resolved = resolve_tasks(_split_tasks(tasks))  # fail on a bad task before loading the model
    inputs = (model_path, *task_files(resolved))
    if output is not None:
        check_output_file(output, inputs=inputs, overwrite=overwrite)
    from moeprune.checkpoint.model_dir import meta_model
    from moeprune.pipeline.plan import placement

    engine = resolve_backend(backend, device)  # a missing vLLM fails here, before any weight is read
    tokenizer = load_tokenizer(model_path)  # the quicker failure first
    if engine == "vllm":  # the engine loads the folder itself (placement is vLLM's own)
        from moeprune.evaluate.vllm_backend import VLLMBackend

        settings = {"dtype": dtype, "backend": "vllm"}
        with VLLMBackend(model_path, tokenizer, dtype=dtype, progress=progress) as engine_backend:
            results = evaluate(None, tokenizer, resolved, limit=limit, batch_size=batch_size, progress=progress,
                               samples=samples, backend=engine_backend)
    else:
        where = placement(model_path, meta_model(model_path), dtype=dtype, device=device, execution=execution,
                          max_memory=max_memory)
        settings = {"dtype": where.dtype, "device": str(where.device), "execution": where.execution, "backend": "hf"}
        model = layerwise = None
        if where.execution == "layerwise":
            from moeprune.execution.layerwise_eval import LayerwiseBackend

            click.echo(f"layer-wise evaluation ({where.reason}): perplexity one layer at a time, generation reads "
                       "the weights from the files for every new token", err=True)
            layerwise = LayerwiseBackend(model_path, tokenizer, dtype=where.dtype, device=where.device,
                                         max_memory=where.max_memory, batch_size=batch_size, progress=progress)
        else:
            model = load_model(model_path, dtype=where.dtype, device=str(where.device))
        results = evaluate(model, tokenizer, resolved, limit=limit, batch_size=batch_size, progress=progress,
                           samples=samples, backend=layerwise)
    report = {
        "model": str(model_path),
        "tasks": results,
        "total_seconds": round(time.perf_counter() - start, 3),
        "settings": {"limit": limit, "batch_size": batch_size, **settings},
        "moeprune_version": __version__,
    }
    click.echo(format_table(results))
    click.echo(f"total: {report['total_seconds']:.1f}s")
    if output is not None:
        write_report(output, report, inputs=inputs, overwrite=overwrite)
        click.echo(f"report written to {output}")
