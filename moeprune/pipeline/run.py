"""`run_recipe`: plan -> observe -> decide -> evaluate the source -> compress and write -> evaluate the
output -> (quantize -> evaluate) -> report. One code path for `run`, `prune --method`, `prune --keep`
and `merge`, whatever the model's size: the plan picks the executor (in memory or layer-wise).

OUT/ holds the compressed model (a stock checkpoint in the source dtype), `report.json` (the public
contract documented in docs/report.md), `report.md` with plots and, for `run`, `observations/`.
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

from moeprune import __version__, distributed
from moeprune.pipeline.recipe import Recipe

__all__ = ["run_recipe", "get_observations", "cache_dir"]

# recipe fields that say where and how a run executes, not what it computes (left out of moeprune.json,
# so that the same recipe gives the same files under either executor)
PLACEMENT_FIELDS = ("execution", "max_memory", "device", "output")


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


def _cache_key(fingerprint: str, calibration: dict, collect: tuple[str, ...], dtype: str) -> str:
    from moeprune.observe.stats import STATS_VERSION

    blob = json.dumps([fingerprint, calibration, sorted(collect), STATS_VERSION, dtype], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]




def trains_in_parallel(plan) -> bool:
    """Under torchrun, whether every rank stays for the recovery: logit KD (router_kd / moe_kd) in memory trains
    data-parallel (recover/parallel.py); otherwise ranks other than 0 leave once observation is reduced."""
    r = plan.recipe.recover
    return (distributed.launched() and plan.execution == "memory" and r is not None and r.logit_kd
            and distributed.context().enabled)


def get_observations(executor, *, log=print, observations_dir=None, every_rank: bool = False):
    """Observations for (model, calibration, the method's needs): from `observations_dir` when given,
    else from the cache when present, else one calibration pass (then cached). Under torchrun the ranks
    other than 0 leave once the statistics are reduced, unless `every_rank` (they then observe even when
    rank 0's cache holds the entry, so that every rank has the statistics)."""
    from moeprune.errors import MoePruneError
    from moeprune.observe import Observations

    plan = executor.plan
    fingerprint = executor.fingerprint()
    if observations_dir is not None:
        obs = Observations.load(observations_dir)
        _check_fingerprint(obs, fingerprint, f"observations in {observations_dir}", plan.shape)
        missing = set(plan.collect) - set(obs.meta.get("collected", []))
        if missing:
            raise MoePruneError(f"observations in {observations_dir} lack {sorted(missing)} needed by "
                                f"{plan.method.name}; re-run `moeprune observe --collect {','.join(sorted(missing))}`")
        return obs, True
    all_means = plan.recipe.merge.all_means_tokens if {"all_means", "output_cosine"} & set(plan.collect) else None
    key = _cache_key(fingerprint, {**plan.calibration.to_dict(), "batch_size": plan.recipe.calibration.batch_size,
                                   "all_means_tokens": all_means}, plan.collect, plan.dtype)
    cached = cache_dir() / key
    obs = None
    if cached.exists() and distributed.is_main() and not every_rank:  # rank 0 alone reads and writes the cache
        try:
            obs = Observations.load(cached)
            _check_fingerprint(obs, fingerprint, f"cached observations {cached}", plan.shape)
            log(f"reusing cached observations {cached} ({obs.num_tokens} tokens)")
        except MoePruneError as exc:  # a damaged cache entry is a miss, replaced below
            log(f"warning: ignoring a damaged cache entry ({exc})")
            shutil.rmtree(cached, ignore_errors=True)
            obs = None
    if distributed.broadcast_flag(obs is not None):  # rank 0's hit; other ranks hold None and leave
        return obs, True
    obs = executor.observe()  # under torchrun: every rank its share, statistics all-reduced
    if not distributed.is_main():
        if every_rank:
            return obs, False
        distributed.leave_unless_main()
    obs.meta["used_default_calibration"] = executor.calibration().used_default
    obs.meta["model_path"] = _portable(plan.src)
    try:
        tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
        obs.save(tmp)
        if not cached.exists():
            os.replace(tmp, cached)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:  # a cache that cannot be written costs a re-run later, not this run
        log(f"warning: could not cache the observations in {cached.parent} ({exc.strerror or exc})")
    return obs, False


def _check_fingerprint(obs, fingerprint: str, where: str, shape=None) -> None:
    """The same model (fingerprint), and statistics whose shapes fit it (a copied fingerprint is not enough)."""
    from moeprune.errors import MoePruneError

    want = obs.meta.get("model_fingerprint")
    if want != fingerprint:
        raise MoePruneError(f"{where} were collected on a different model (fingerprint {want}, this model "
                            f"{fingerprint}); re-run `moeprune observe` on this model")
    if shape is not None:
        obs.check(where=where, model=shape)


def _portable(path) -> str:
    from moeprune.checkpoint import portable_path

    return portable_path(path)


def _retained(base: dict, compressed: dict) -> dict:
    out = {}
    for task, res in compressed.items():
        b = base.get(task, {}).get("score")
        if b:
            ratio = res["score"] / b
            out[task] = round(ratio if res.get("higher_is_better", True) else 1 / ratio, 4)
    return out


def run_recipe(recipe: Recipe, *, out_dir: str | Path | None = None, overwrite: bool = False,
               progress: bool = True, log=print, observations_dir=None, save_observations: bool = True,
               plan=None, inputs=()) -> dict:
    """Run the whole pipeline; returns the report dict written to OUT/report.json."""
    from moeprune.execution import make_executor
    from moeprune.pipeline.plan import make_plan

    plan = plan or make_plan(recipe, out_dir=out_dir, overwrite=overwrite,  # every early check, no weights
                             inputs=(*inputs, observations_dir))
    log(plan.summary())
    timer = _Timer()
    torch.manual_seed(recipe.seed)
    ex = make_executor(plan, progress=progress, log=log)
    try:
        obs, reused = None, False
        parallel = trains_in_parallel(plan)
        if plan.method.needs_observations:
            with timer("observe"):
                obs, reused = get_observations(ex, log=log, observations_dir=observations_dir,
                                               every_rank=parallel)
        if not parallel:
            distributed.leave_unless_main()  # torchrun: rank 0 alone decides, evaluates and writes
        with timer("score"):
            decision = plan.method.decide(obs, plan, ex)
        if not distributed.is_main():  # torchrun with logit-KD recovery: this rank trains its share, then leaves
            ex.recover_share(decision, obs)
            distributed.leave_unless_main()
        if decision.selection.protected:
            log(f"protected super experts: {decision.selection.protected}")
        base_eval = {}
        if plan.tasks and recipe.eval.base:
            with timer("eval_base"):
                base_eval = ex.evaluate()
        with plan.output as tmp:
            report = _report_head(plan, obs, reused, decision)
            provenance = _provenance(plan, obs, decision)
            with timer("compress"):
                ex.compress(decision, obs, tmp, provenance=provenance)
            if "recovery" in provenance:
                report["recovery"] = provenance["recovery"]
            comp_eval = {}
            if plan.tasks:
                with timer("eval_compressed"):
                    comp_eval = ex.evaluate_output(tmp)
            report["eval"] = {"base": base_eval, "compressed": comp_eval, "retained": _retained(base_eval, comp_eval)}
            _sizes(report, plan, tmp, stage="compressed")
            if recipe.quantize is not None:
                _quantize_stage(report, plan, ex, obs, decision, tmp, timer)
            if obs is not None and save_observations:
                obs.save(tmp / "observations")
            report["timings"] = {**timer.timings, "total": round(sum(timer.timings.values()), 3)}
            _write_reports(tmp, report, obs, decision.selection, log)
    finally:
        ex.close()
    return report


def _report_head(plan, obs, reused: bool, decision) -> dict:
    recipe, sel = plan.recipe, decision.selection
    n_after = len(next(iter(decision.kept.values())))
    report = {
        "moeprune_version": __version__,
        "model": {"path": _portable(plan.src), "architecture": plan.shape.spec.name,
                  "model_type": plan.shape.config.model_type},
        "recipe": {**recipe.model_dump(mode="json"), "model": _portable(plan.src)},
        "execution": plan.execution,
        "execution_reason": plan.execution_reason,
        "dtype": {"compute": plan.dtype, "source": plan.source_dtype, "output": plan.source_dtype},
        "compression": {
            "method": sel.method, "ratio": recipe.ratio, "keep": n_after, "allocation": sel.allocation,
            "experts_before": plan.shape.num_experts, "experts_after": n_after,
            "kept": {str(k): v for k, v in decision.kept.items()},
            "dropped": {str(k): v for k, v in sel.dropped.items()},
            "protected": {str(k): v for k, v in sel.protected.items()},
            "never_routed": {str(k): v for k, v in sel.never_routed.items()},
        },
    }
    if obs is not None:
        report["calibration"] = {**obs.meta.get("calibration", {}), "num_tokens": obs.num_tokens,
                                 "used_default": bool(obs.meta.get("used_default_calibration", False))}
        report["observations"] = {"reused": reused, "num_tokens": obs.num_tokens,
                                  "fingerprint": obs.meta.get("model_fingerprint")}
    if decision.clusters is not None:
        report["compression"]["merged"] = {str(i): c for i, c in decision.clusters.items()}
    return report


def _sizes(report: dict, plan, folder: Path, *, stage: str) -> None:
    """Bytes are the weight files on disk (input files vs output files); parameters separately."""
    from moeprune.checkpoint.files import weights_summary

    names = plan.names
    before = weights_summary(plan.src, names)
    after = weights_summary(folder, names if stage == "compressed" else None)  # quantized names are not the model's
    comp = report["compression"]
    if stage == "compressed":
        comp.update({"params_before": before["params"], "params_after": after["params"],
                     "bytes_before": before["bytes"], "bytes_after": after["bytes"],
                     "expert_bytes_before": before["expert_bytes"], "expert_bytes_after": after["expert_bytes"]})
    ev = report["eval"]
    stages = report.setdefault("sizes", {"unit": "bytes of safetensors files on disk", "stages": {}})["stages"]
    stages.setdefault("base", {"bytes": before["bytes"], "scores": {t: r["score"] for t, r in ev["base"].items()}})
    scores = ev["compressed" if stage == "compressed" else "quantized"]
    stages["compressed" if stage == "compressed" else "compressed+quantized"] = {
        "bytes": after["bytes"], "scores": {t: r["score"] for t, r in scores.items()}}
    report["sizes"]["files_on_disk"] = after["bytes"]


def _quantize_stage(report: dict, plan, ex, obs, decision, folder: Path, timer) -> None:
    """Quantize the compressed model and replace the weights in `folder` by its quantized save. Uniform
    quantization (RTN or GPTQ) is one pass over the decoder layers in either executor; its values are written
    into the output's shards, evaluated, then packed, so both executors write the same files."""
    from moeprune.checkpoint import write_json
    from moeprune.compress.quantize import pack_checkpoint, write_values

    if plan.recipe.quantize.mixed_budget is not None:
        return _quantize_mixed_stage(report, plan, ex, obs, decision, folder, timer)
    with timer("quantize"):
        quant, values = ex.quantize(folder)
    try:
        with timer("save"):
            write_values(folder, values)
    finally:
        values.close()
    with timer("eval_quantized"):
        quant_eval = ex.evaluate_quantized(folder) if plan.tasks else {}
    report["quantization"] = quant.to_dict()
    report["eval"]["quantized"] = quant_eval
    report["eval"]["retained_quantized"] = _retained(report["eval"]["base"], quant_eval)
    with timer("save"):
        pack_checkpoint(folder, quant)
        record = json.loads((folder / "moeprune.json").read_text())
        record["quantization"] = quant.to_dict(timings=False)  # the same bytes whichever executor ran
        write_json(folder / "moeprune.json", record)
    _sizes(report, plan, folder, stage="quantized")


def _quantize_mixed_stage(report: dict, plan, ex, obs, decision, folder: Path, timer) -> None:
    """Mixed precision (torchao float8 per layer): the in-memory model quantized and saved over `folder`."""
    from moeprune.compress.quantize import write_quantized

    if plan.dtype != plan.source_dtype:  # the output keeps the source dtype (quantized tensors aside)
        ex.model.to(getattr(torch, plan.source_dtype))
    with timer("quantize"):
        quant = _quantize(ex.model, plan, obs, decision.kept)
    with timer("eval_quantized"):
        quant_eval = ex._evaluate(ex.model, ex.tokenizer) if plan.tasks else {}
    report["quantization"] = quant.to_dict()
    report["eval"]["quantized"] = quant_eval
    report["eval"]["retained_quantized"] = _retained(report["eval"]["base"], quant_eval)
    record = json.loads((folder / "moeprune.json").read_text())
    for f in [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]:
        f.unlink(missing_ok=True)
    with timer("save"):
        write_quantized(ex.model, quant, folder, source_dir=plan.src, provenance=record)
    _sizes(report, plan, folder, stage="quantized")


def _quantize(model, plan, obs, kept: dict[int, list[int]]):
    """Mixed precision: quantize the compressed model in place; layer importance = summed scores of its kept
    experts."""
    from moeprune.compress.quantize import MixedBudget, quantize_model
    from moeprune.score import score_layer

    q = plan.recipe.quantize
    importance = {}
    for i, experts in kept.items():
        scores = score_layer(q.importance, obs.layers[i])[experts]
        importance[i] = float(scores[torch.isfinite(scores)].clamp(min=0).sum())
    return quantize_model(model, bits=q.bits, group_size=plan.quant_group_size,
                          mixed=MixedBudget(avg_bits=q.mixed_budget), importance=importance)


def _provenance(plan, obs, decision) -> dict:
    """moeprune.json: what was done to which model, with nothing that depends on where it ran."""
    sel, recipe = decision.selection, plan.recipe.model_dump(mode="json")
    recipe = {k: v for k, v in recipe.items() if k not in PLACEMENT_FIELDS}
    recipe["model"] = _portable(plan.src)
    record = {"base_model": _portable(plan.src), "method": sel.method, "ratio": plan.recipe.ratio,
              "kept": decision.kept, "dropped": sel.dropped, "protected": sel.protected, "scores": sel.scores,
              "calibration": obs.meta.get("calibration") if obs is not None else None, "recipe": recipe}
    if decision.clusters is not None:
        record["merged"] = decision.clusters
    record.update(decision.details)
    return record


def _write_reports(folder: Path, report: dict, obs, selection, log) -> None:
    """report.json, and report.md (a convenience: a plotting failure is reported, it does not discard
    the compressed model)."""
    from moeprune.checkpoint import write_json
    from moeprune.report import write_report_md

    write_json(folder / "report.json", report)
    try:
        write_report_md(folder, report, observations=obs, selection=selection)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:
        log(f"warning: report.md could not be written ({type(exc).__name__}: {exc}); report.json is complete")
