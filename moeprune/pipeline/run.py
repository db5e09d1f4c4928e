"""`run_recipe`: observe -> score -> prune -> evaluate (base and compressed) -> write OUT/.

OUT/ holds the compressed model (a stock checkpoint), `observations/`, `report.json` (the public
contract documented in docs/report.md) and `report.md` with plots.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from moeprune import __version__
from moeprune.compress.save import PROVENANCE_FILE
from moeprune.errors import MoePruneError
from moeprune.inspect import summarize_module
from moeprune.io import atomic_output_dir, check_output_dir, load_model, load_tokenizer, meta_model, resolve_model_dir
from moeprune.models import MoEAdapter
from moeprune.observe import Observations, model_fingerprint, observe
from moeprune.pipeline.recipe import Recipe
from moeprune.pipeline.methods import apply_decision, decide
from moeprune.score import experts_to_keep
from moeprune import strict_json

__all__ = ["run_recipe", "get_observations", "cache_dir"]


class _Timer:
    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(self.timings.get(stage, 0.0) + time.perf_counter() - start, 3)


def cache_dir() -> Path:
    root = os.environ.get("MOEPRUNE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeprune"
    return Path(root) / "observations"


def _cache_key(fingerprint: str, calibration: dict, collect: tuple[str, ...]) -> str:
    from moeprune.observe.stats import STATS_VERSION

    blob = json.dumps([fingerprint, calibration, sorted(collect), STATS_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _calibration_spec(recipe: Recipe):
    from moeprune.observe.calibration import parse_calibration_spec

    c = recipe.calibration
    return parse_calibration_spec(c.spec, max_length=c.max_length, pack=c.pack, seed=recipe.seed,
                                  chat_template=c.chat_template, text_field=c.text_field)


def load_recipe_calibration(recipe: Recipe, tokenizer):
    from moeprune.observe.calibration import load_calibration

    return load_calibration(_calibration_spec(recipe), tokenizer, batch_size=recipe.calibration.batch_size)


def get_observations(model, tokenizer, recipe: Recipe, *, progress: bool = True,
                     log=print) -> tuple[Observations, bool]:
    """Observations for (model, calibration spec, method's needs): from the cache when present, else one
    calibration pass."""
    from moeprune.pipeline.methods import method_collect

    collect = method_collect(recipe.method)
    all_means_tokens = recipe.merge.all_means_tokens if "all_means" in collect else None
    spec = _calibration_spec(recipe)
    fingerprint = model_fingerprint(model)
    key = _cache_key(fingerprint, {**spec.to_dict(), "batch_size": recipe.calibration.batch_size,
                                   "all_means_tokens": all_means_tokens}, collect)
    cached = cache_dir() / key
    if (cached / "observations.json").is_file():
        obs = Observations.load(cached)
        obs.check_model(model, where=f"cached observations {cached}")
        log(f"reusing cached observations {cached} ({obs.num_tokens} tokens)")
        return obs, True
    calib = load_recipe_calibration(recipe, tokenizer)
    if calib.used_default:
        log("no calibration data given: using the built-in mixed calibration set (demo corpus calib split)")
    obs = observe(model, calib, collect=collect, all_means_tokens=all_means_tokens, progress=progress)
    obs.meta["used_default_calibration"] = calib.used_default
    tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
    obs.save(tmp)
    if not cached.exists():
        os.replace(tmp, cached)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return obs, False


def _eval(model, tokenizer, recipe: Recipe, progress: bool) -> dict:
    from moeprune.evaluate import evaluate

    if not recipe.eval.tasks:
        return {}
    return evaluate(model, tokenizer, recipe.eval.tasks, limit=recipe.eval.limit,
                    batch_size=recipe.eval.batch_size, progress=progress)


def _retained(base: dict, compressed: dict) -> dict:
    out = {}
    for task, res in compressed.items():
        b = base.get(task, {}).get("score")
        if b:
            ratio = res["score"] / b
            out[task] = round(ratio if res.get("higher_is_better", True) else 1 / ratio, 4)
    return out


def run_recipe(recipe: Recipe, *, out_dir: str | Path | None = None, overwrite: bool = False,
               progress: bool = True, log=print) -> dict:
    """Run the whole pipeline; returns the report dict written to OUT/report.json."""
    out = out_dir or recipe.output
    if not out:
        raise MoePruneError("no output folder: pass -o OUT or set 'output' in the recipe")
    src = resolve_model_dir(recipe.model)
    check_output_dir(out, inputs=(src,), overwrite=overwrite)
    shape = MoEAdapter(meta_model(src))  # feasibility before any weight is read
    experts_to_keep(shape.num_experts, ratio=recipe.ratio, keep=recipe.keep, top_k=shape.top_k, where="recipe")
    if recipe.eval.tasks:
        from moeprune.evaluate import resolve_tasks

        resolve_tasks(recipe.eval.tasks)  # fail on a bad task before any model work
    timer = _Timer()
    torch.manual_seed(recipe.seed)
    with timer("load"):
        device = None if recipe.device == "auto" else recipe.device
        model = load_model(src, dtype=recipe.dtype, device=device)
        tokenizer = load_tokenizer(src)
    adapter = MoEAdapter(model)
    with timer("observe"):
        obs, reused = get_observations(model, tokenizer, recipe, progress=progress, log=log)
    with timer("score"):
        decision = decide(model, obs, recipe, calibration=lambda: load_recipe_calibration(recipe, tokenizer),
                          progress=progress)
    selection = decision.selection
    if selection.protected:
        log(f"protected super experts: {selection.protected}")
    base_eval = {}
    if recipe.eval.base:
        with timer("eval_base"):
            base_eval = _eval(model, tokenizer, recipe, progress)
    before = summarize_module(model)
    with timer("prune"):
        kept = apply_decision(model, decision, obs, recipe)
    after = summarize_module(model)
    with timer("eval_compressed"):
        comp_eval = _eval(model, tokenizer, recipe, progress)
    report = _build_report(recipe, src, adapter, obs, reused, selection, kept, before, after, base_eval, comp_eval)
    quant = None
    if recipe.quantize is not None:
        with timer("quantize"):
            quant = _quantize(model, recipe, obs, kept)
        with timer("eval_quantized"):
            quant_eval = _eval(model, tokenizer, recipe, progress)
        report["quantization"] = quant.to_dict()
        report["eval"]["quantized"] = quant_eval
        report["eval"]["retained_quantized"] = _retained(base_eval, quant_eval)
    report["sizes"] = _sizes(report, quant)
    if decision.merge_plan is not None:
        report["compression"]["merged"] = {str(i): c for i, c in decision.merge_plan.clusters.items()}
    with atomic_output_dir(out, inputs=(src,), overwrite=overwrite) as tmp:
        from moeprune.compress.save import write_checkpoint

        with timer("save"):
            if quant is None:
                write_checkpoint(model, tmp, source_dir=src, provenance=_provenance(report, selection))
            else:
                from moeprune.compress.quantize import write_quantized

                write_quantized(model, quant, tmp, source_dir=src, provenance=_provenance(report, selection))
            report["sizes"]["files_on_disk"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            obs.save(tmp / "observations")
        report["timings"] = {**timer.timings}
        report["timings"]["total"] = round(sum(timer.timings.values()), 3)
        (tmp / "report.json").write_text(strict_json.dumps(report, indent=2) + "\n")
        _write_markdown(tmp, report, obs, selection, log)
    return report


def _quantize(model, recipe: Recipe, obs, kept: dict[int, list[int]]):
    """Quantize the compressed model in place; layer importance = summed scores of its kept experts."""
    from moeprune.compress.quantize import MixedBudget, quantize_model
    from moeprune.score import score_layer

    q = recipe.quantize
    importance = None
    mixed = None
    if q.mixed_budget is not None:
        mixed = MixedBudget(avg_bits=q.mixed_budget)
        importance = {}
        for i, experts in kept.items():
            scores = score_layer(q.importance, obs.layers[i])[experts]
            importance[i] = float(scores[torch.isfinite(scores)].clamp(min=0).sum())
    return quantize_model(model, bits=q.bits, group_size=q.group_size, mixed=mixed, importance=importance)


def _sizes(report: dict, quant) -> dict:
    """The bytes/quality table: weights bytes of each stage and its scores."""
    comp, ev = report["compression"], report["eval"]
    rows = {"base": {"bytes": comp["bytes_before"], "scores": {t: r["score"] for t, r in ev["base"].items()}},
            "compressed": {"bytes": comp["bytes_after"],
                           "scores": {t: r["score"] for t, r in ev["compressed"].items()}}}
    if quant is not None:
        rows["compressed+quantized"] = {"bytes": quant.bytes_after,
                                        "scores": {t: r["score"] for t, r in ev["quantized"].items()}}
    return {"stages": rows}


def _provenance(report: dict, selection) -> dict:
    return {"merged": report["compression"].get("merged"),"base_model": report["model"]["path"], "method": selection.method,
            "ratio": report["compression"]["ratio"], "kept": selection.kept, "dropped": selection.dropped,
            "protected": selection.protected, "scores": selection.scores,
            "calibration": report["calibration"], "recipe": report["recipe"]}


def _write_markdown(folder: Path, report: dict, obs, selection, log) -> None:
    """report.md is a convenience: a plotting failure is reported, it does not discard the compressed model."""
    from moeprune.report import write_report_md

    try:
        write_report_md(folder, report, observations=obs, selection=selection)
    except (OSError, ValueError, RuntimeError) as exc:
        log(f"warning: report.md could not be written ({type(exc).__name__}: {exc}); report.json is complete")


def _build_report(recipe, src, adapter, obs, reused, selection, kept, before, after, base_eval, comp_eval) -> dict:
    n_after = len(next(iter(kept.values())))
    return {
        "moeprune_version": __version__,
        "model": {"path": str(src), "architecture": adapter.spec.name, "model_type": adapter.config.model_type},
        "recipe": recipe.model_dump(mode="json"),
        "calibration": {**obs.meta.get("calibration", {}), "num_tokens": obs.num_tokens,
                        "used_default": bool(obs.meta.get("used_default_calibration", False))},
        "observations": {"reused": reused, "num_tokens": obs.num_tokens,
                         "fingerprint": obs.meta.get("model_fingerprint")},
        "compression": {
            "method": selection.method, "ratio": recipe.ratio, "keep": n_after, "allocation": selection.allocation,
            "experts_before": before.experts_per_layer[adapter.layer_indices[0]], "experts_after": n_after,
            "params_before": before.params["total"], "params_after": after.params["total"],
            "bytes_before": before.bytes["total"], "bytes_after": after.bytes["total"],
            "expert_bytes_before": before.bytes["expert"], "expert_bytes_after": after.bytes["expert"],
            "kept": {str(k): v for k, v in kept.items()},
            "dropped": {str(k): v for k, v in selection.dropped.items()},
            "protected": {str(k): v for k, v in selection.protected.items()},
            "never_routed": {str(k): v for k, v in selection.never_routed.items()},
        },
        "eval": {"base": base_eval, "compressed": comp_eval, "retained": _retained(base_eval, comp_eval)},
    }
