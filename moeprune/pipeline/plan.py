"""The plan: every decision that needs no weights, computed once from `config.json` and the recipe.

`make_plan` builds the model on the meta device (no memory, no weights) and settles the method object
and what it needs, the experts kept per layer and the routing-group rule, the compute dtype (`auto` = the
checkpoint's own), the device, the execution mode (`auto` picks layer-wise when the model does not fit
in `max_memory`), the quantization scheme, the eval tasks, the calibration sources and the output
folder. Everything knowable here fails here, in one line, before a byte of weights is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from moeprune import distributed
from moeprune.errors import MoePruneError
from moeprune.units import DTYPE_BYTES, parse_memory

__all__ = ["Plan", "Placement", "placement", "make_plan", "resolve_device", "free_memory", "MEMORY_MARGIN"]

# `auto` keeps the model in memory when its weights in the compute dtype, times this factor, plus
# `MEMORY_HEADROOM` bytes (activations, the interpreter, calibration batches) fit in max_memory.
MEMORY_MARGIN = 1.2
MEMORY_HEADROOM = 256 * 2**20


def resolve_device(spec: str | None) -> torch.device:
    """`auto`/None -> CUDA when available, else CPU; anything else must be a device this torch can use."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise MoePruneError(f"device: {spec!r} is not a device; use cpu, cuda or cuda:N (or auto)") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MoePruneError(f"device: {spec!r} needs CUDA, which this torch build or machine does not have; "
                                "use cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MoePruneError(f"device: {spec!r} does not exist; this machine has {torch.cuda.device_count()} "
                                "CUDA device(s)")
        return dev
    backend = getattr(torch, dev.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise MoePruneError(f"device: {spec!r} is not available to this torch; use cpu, cuda or auto")
    return dev


def free_memory(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


@dataclass
class Plan:
    """Everything decided before any weight is read (see the module docstring)."""

    recipe: object
    src: Path
    shape: object  # MoEAdapter over the model built on the meta device
    method: object  # a moeprune.methods.Method
    n_keep: int | None
    dtype: str  # compute dtype
    source_dtype: str  # what the checkpoint stores (outputs keep it)
    device: torch.device
    execution: str  # "memory" | "layerwise"
    execution_reason: str
    model_bytes: int  # weights in the compute dtype
    max_memory: int
    collect: tuple[str, ...] = ()
    quant_group_size: int | None = None
    tasks: list = field(default_factory=list)
    calibration: object = None  # CalibrationSpec
    output: object = None  # OutputFolder
    eval_backend: str = "hf"  # recipe.eval.backend resolved: "hf" or "vllm"
    recovery_memory: str | None = None  # the memory table of every recovery method, when the recipe recovers
    recovery_row: object = None  # the recipe's own recovery method's RecoveryMemory (recover/memory.py)
    quantize_memory: str | None = None  # GPTQ's largest decoder layer, when the recipe quantizes with GPTQ
    generate_engine: str | None = None  # recover.generate's sampler resolved: "hf" or "vllm" (None: no generation)
    processes: int = 1  # torchrun's WORLD_SIZE (or `run --dry-run --processes N`): the memory rows are per process
    recover_parallel: str | None = None  # logit KD in memory on several processes: "data" or "sharded" (resolved)
    keep_plan: dict | None = None

    @cached_property
    def names(self):
        """On-disk tensor names of the model family (CheckpointNames), built once."""
        from moeprune.checkpoint.names import CheckpointNames

        return CheckpointNames(self.shape.model)

    def summary(self) -> str:
        line = (f"plan: {self.method.name} on {self.shape.spec.name}, {self.dtype} on {self.device}, "
                f"execution {self.execution} ({self.execution_reason})")
        if self.recovery_memory:
            over = (f", {self.processes} processes" + (f", {self.recover_parallel}" if self.recover_parallel else "")
                    if self.processes > 1 else "")
            line += f"\nrecovery memory per process (docs/scale.md{over}):\n" + self.recovery_memory
        if self.quantize_memory:
            line += "\nquantize memory per process: " + self.quantize_memory
        return line


def _model_bytes(meta, dtype: str) -> int:
    seen, n = set(), 0
    for p in meta.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n * DTYPE_BYTES[dtype]


def _context(config) -> int | None:
    ctx = getattr(config, "max_position_embeddings", None)
    return ctx if isinstance(ctx, int) and ctx > 0 else None


def _check_context(recipe, config) -> None:
    ctx = _context(config)
    if ctx and recipe.calibration.max_length is not None and recipe.calibration.max_length > ctx:
        raise MoePruneError(f"calibration.max_length: {recipe.calibration.max_length} tokens is beyond the model's "
                            f"context of {ctx} (max_position_embeddings); use at most {ctx}")


def _check_ratio(recipe, shape) -> int | None:
    from moeprune.score import experts_to_keep
    from moeprune.score.select import routing_groups

    if recipe.ratio is None and recipe.keep is None:
        return None
    e = shape.num_experts
    if shape.top_k >= e:
        raise MoePruneError(f"recipe: the model routes every token to top-k={shape.top_k} of its {e} experts, so no "
                            "expert can be pruned with this router (a layer keeps at least top-k experts); check "
                            "the config's top-k, or compress otherwise (e.g. moeprune quantize)")
    n_keep = experts_to_keep(e, ratio=recipe.ratio, keep=recipe.keep, top_k=shape.top_k, where="recipe")
    if n_keep >= e:
        lowest = 1 / e
        what = f"ratio {recipe.ratio}" if recipe.ratio is not None else f"keep {recipe.keep}"
        raise MoePruneError(f"recipe: {what} of {e} experts drops none; use a ratio of at least {lowest:.4g} "
                            f"(one expert) or keep fewer than {e}")
    routing_groups(shape, n_keep, "recipe")
    return n_keep


@dataclass
class Placement:
    """Where a model's weights live for a run: compute dtype, device, executor and memory budget."""

    dtype: str
    source_dtype: str
    device: torch.device
    execution: str
    reason: str
    max_memory: int
    model_bytes: int


def placement(src: Path, meta, *, dtype: str = "auto", device: str = "auto", execution: str = "auto",
              max_memory=None) -> Placement:
    """Resolve dtype (`auto` = the checkpoint's), device and execution (`auto` = layer-wise when the model
    does not fit in `max_memory`) for the model folder `src`, whose model built on meta is `meta`."""
    from moeprune.checkpoint import checkpoint_dtype

    if execution not in ("auto", "memory", "layerwise"):
        raise MoePruneError(f"execution: {execution!r} is not one of auto, memory, layerwise")
    source_dtype = checkpoint_dtype(src, meta.config)
    dtype = source_dtype if dtype in (None, "auto") else dtype
    if dtype not in DTYPE_BYTES:
        raise MoePruneError(f"dtype: {dtype!r} is not one of auto, float32, bfloat16, float16")
    dev = resolve_device(device)
    model_bytes = _model_bytes(meta, dtype)
    mode, reason, budget = _execution(execution, max_memory, model_bytes, dev)
    return Placement(dtype, source_dtype, dev, mode, reason, budget, model_bytes)


def _execution(execution: str, max_memory, model_bytes: int, device: torch.device) -> tuple[str, str, int]:
    budget = parse_memory(max_memory)
    if budget is None:
        budget = free_memory(device)
        where = f"free memory of {device.type}"
        local = distributed.local_processes() if device.type == "cpu" else 1
        if local > 1:  # the processes on this machine share its memory
            budget //= local
            where += f" / {local} processes on this machine"
        if distributed.launched():  # every rank plans with the same budget (the smallest), so all choose alike
            budget = min(distributed.gather_ints(budget))
    else:
        where = "max_memory"
    need = int(model_bytes * MEMORY_MARGIN) + MEMORY_HEADROOM
    if execution != "auto":
        return execution, "asked for", budget
    if need <= budget:
        return "memory", f"{need / 1e9:.2f} GB needed <= {budget / 1e9:.2f} GB {where}", budget
    return "layerwise", f"{need / 1e9:.2f} GB needed > {budget / 1e9:.2f} GB {where}", budget


def _quantize(recipe, shape, execution: str) -> int | None:
    q = recipe.quantize
    if q is None:
        return None
    if execution == "layerwise" and q.mixed_budget is not None:
        raise MoePruneError("quantize.mixed_budget: mixed precision needs the compressed model in memory, and this "
                            "run is layer-wise; drop quantize.mixed_budget (uniform rtn/gptq runs layer by layer), "
                            "or set execution: memory with a larger max_memory")
    if q.mixed_budget is not None and q.bits != 8:
        raise MoePruneError("quantize.mixed_budget mixes 4- and 8-bit layers; set quantize.bits: 8")
    if q.mixed_budget is not None:
        return None
    from moeprune.compress.quantize_plan import check_quantize

    # pruning and merging keep every width, so the source's widths decide (CHANNEL = one scale per row)
    return check_quantize(shape.model, q.bits, q.group_size, option="quantize.group_size")


def _check_quantize_memory(plan: "Plan") -> None:
    """Layer-wise GPTQ holds one decoder layer, its Hessians and the solver's work at a time: refuse, before any
    weight is read, a largest layer that does not fit max_memory, and say what it needs in the plan line."""
    q = plan.recipe.quantize
    if q is None or q.method != "gptq" or q.mixed_budget is not None:
        return
    from moeprune.compress.quantize_plan import gptq_layer_memory

    need = gptq_layer_memory(plan.shape.model, n_keep=plan.n_keep, weight_bytes=DTYPE_BYTES[plan.source_dtype])
    plan.quantize_memory = (f"gptq, largest decoder layer: {need['total'] / 1e9:.2f} GB (weights read "
                            f"{need['weights'] / 1e9:.2f} + Hessians {need['hessians'] / 1e9:.2f} + solver "
                            f"{need['solver'] / 1e9:.2f}) plus the calibration hidden states")
    if plan.execution == "layerwise" and need["total"] > plan.max_memory:
        raise MoePruneError(f"quantize.method: gptq needs about {need['total'] / 1e9:.2f} GB for its largest decoder "
                            f"layer (weights {need['weights'] / 1e9:.2f} + Hessians {need['hessians'] / 1e9:.2f} + "
                            f"solver {need['solver'] / 1e9:.2f}), over the {plan.max_memory / 1e9:.2f} GB max_memory; "
                            "raise max_memory or use quantize.method: rtn")


def recovery_rows(plan: "Plan", execution: str | None = None, processes: int | None = None) -> list:
    """The memory of every recovery method on this plan's model, dtype, execution (or `execution`), recipe and
    process count (or `processes`), per process: moe_kd also with LoRA adapters, and on several processes in
    memory also sharded (FSDP2)."""
    from moeprune.pipeline.recipe import ADAPTER_RANK
    from moeprune.recover.memory import METHODS, recovery_memory

    r, c = plan.recipe.recover, plan.recipe.calibration
    execution = execution or plan.execution
    processes = (processes or plan.processes) if execution == "memory" else 1  # layer-wise: rank 0 alone trains
    rows_per_process = -(-c.batch_size // processes)  # each rank runs its share of a step's rows (at least one)
    step = rows_per_process * (c.max_length or min(512, _context(plan.shape.config) or 512))
    ranks = [None, r.rank if r.adapter == "lora" else ADAPTER_RANK]  # moe_kd, and moe_kd with LoRA adapters
    kw = dict(dtype=plan.dtype, n_keep=plan.n_keep, execution=execution, batch_tokens=r.batch_tokens,
              step_tokens=step, top_k=r.top_k, target_tokens=r.tokens, processes=processes)
    rows = [recovery_memory(plan.shape, method=m, lora_rank=rank, **kw)
            for m in METHODS for rank in (ranks if m == "moe_kd" else [None])]
    if processes > 1 and execution == "memory":
        rows.append(recovery_memory(plan.shape, method="moe_kd", parallel="sharded", **kw))
    return rows


def _sharded_processes(plan: "Plan") -> tuple[int, float] | None:
    """The fewest processes (2 to 64, powers of two) over which sharded moe_kd fits max_memory, and its need."""
    from moeprune.recover.memory import recovery_label

    for n in (2, 4, 8, 16, 32, 64):
        row = next(row for row in recovery_rows(plan, "memory", n) if row.method == recovery_label(
            "moe_kd", parallel="sharded"))
        if row.total <= plan.max_memory:
            return n, row.total
    return None


def _recover_parallel(plan: "Plan", rows: list) -> str:
    """recover.parallel resolved for this run ("data" or "sharded"), refusing in one line what cannot run."""
    from moeprune.recover.memory import recovery_label

    r = plan.recipe.recover
    if r.parallel == "sharded":
        if plan.processes == 1:
            raise MoePruneError("recover.parallel: sharded needs several processes; launch with torchrun "
                                "--nproc-per-node N (plan it with run --dry-run --processes N), or set "
                                "recover.parallel: auto")
        if not r.full_moe_kd:
            raise MoePruneError(f"recover.parallel: sharded shards moe_kd's MoE-block state, not "
                                f"{recovery_label(r.method, r.adapter, r.rank)}'s; set recover.parallel: data")
        if plan.execution != "memory":
            raise MoePruneError("recover.parallel: sharded trains the model loaded in memory and this run is "
                                "layer-wise; set execution: memory, or recover.parallel: auto")
        return "sharded"
    if r.parallel == "auto" and r.full_moe_kd and plan.processes > 1 and plan.execution == "memory":
        data, sharded = (next(row for row in rows if row.method == recovery_label("moe_kd", parallel=p))
                         for p in ("data", "sharded"))
        if data.total > plan.max_memory and sharded.total < data.total:
            return "sharded"
    return "data"


def _check_recover_memory(plan: "Plan") -> None:
    """Refuse, before any weight is read, a recovery method that cannot fit this run's memory budget, naming
    the ones that fit. Logit KD under layer-wise execution streams the frozen weights (execution/streamkd.py);
    with `execution: auto`, a logit KD that does not fit in memory makes the run layer-wise when streamed needs
    less (and is refused with that smaller need when it does not fit either); adapters too (their frozen bases
    stream with the other frozen weights)."""
    from moeprune.recover.memory import memory_table, recovery_label

    r = plan.recipe.recover
    if r is None or r.method == "none":
        return
    rows = recovery_rows(plan)
    parallel = _recover_parallel(plan, rows)
    label = recovery_label(r.method, r.adapter, r.rank, parallel)
    mine = next(row for row in rows if row.method == label)
    if (mine.total > plan.max_memory and r.logit_kd and plan.execution == "memory"
            and plan.recipe.execution == "auto" and r.parallel != "sharded"  # sharded trains in memory
            and (plan.recipe.quantize is None or plan.recipe.quantize.mixed_budget is None)):
        streamed = recovery_rows(plan, "layerwise")  # layer-wise: rank 0 alone trains, nothing is sharded
        lw = next(row for row in streamed if row.method == recovery_label(r.method, r.adapter, r.rank))
        if lw.total < mine.total:  # streamed: it fits, or the refusal below gives the smaller need
            plan.execution = "layerwise"
            plan.execution_reason += (f"; {mine.method} needs {mine.total / 1e9:.2f} GB in memory, "
                                      f"{lw.total / 1e9:.2f} GB layer-wise")
            rows, mine = streamed, lw
    plan.recovery_memory = memory_table(rows, plan.max_memory)
    plan.recovery_row = mine
    if plan.processes > 1 and plan.execution == "memory" and r.logit_kd:
        plan.recover_parallel = parallel
    fits = [row.method for row in rows if row.total <= plan.max_memory]
    alternatives = (f"methods that fit: {', '.join(fits)}" if fits else "no recovery method fits; raise max_memory "
                    "or drop recover")
    if mine.total > plan.max_memory:
        if r.full_moe_kd and any(f.startswith("moe_kd+") for f in fits):
            alternatives += " (moe_kd+lora: recover.adapter: lora, recover.rank: R)"
        shard = _sharded_processes(plan) if r.full_moe_kd else None
        if "moe_kd sharded" in fits:
            alternatives += " (moe_kd sharded: recover.parallel: sharded)"
        elif shard is not None and shard[0] > plan.processes:
            alternatives += (f"; or moe_kd sharded in memory over {shard[0]} processes ({shard[1] / 1e9:.2f} GB each: "
                             f"torchrun --nproc-per-node {shard[0]}, recover.parallel: sharded)")
        where = " layer-wise (streamed)" if plan.execution == "layerwise" and r.logit_kd else ""
        raise MoePruneError(f"recover: {mine.method} needs about {mine.total / 1e9:.2f} GB per process{where} (weights "
                            f"{mine.weights / 1e9:.2f} + training state {mine.state / 1e9:.2f} + activations "
                            f"{mine.activations / 1e9:.2f} + teacher targets {mine.targets / 1e9:.2f}), over the "
                            f"{plan.max_memory / 1e9:.2f} GB budget; {alternatives}, or lower calibration.batch_size "
                            "/ recover.tokens")


def _check_recover(recipe, shape, execution: str) -> None:
    r = recipe.recover
    if r is None:
        return
    from moeprune.recover.blockwise import gate_candidates
    from moeprune.recover import trainable_parameters

    key, _, _ = gate_candidates(r.gate_scale, shape.spec, shape.config)  # a forced gate scale needs the flag
    if key is not None and r.gate_scale != "keep":
        from moeprune.recover.block import set_gate_flag

        set_gate_flag(shape.layers[0].block, key, bool(getattr(shape.config, key)))  # the modules keep it
    if r.trains is not None:
        trainable_parameters(shape.model, r.trains)  # something to train
    _check_generate(recipe, shape.config)


def generate_engine(recipe, device) -> str | None:
    """recover.generate's sampler resolved for this run ("hf" or "vllm"), None without generation; a vLLM that
    is asked for and not installed is a one-line error."""
    g = recipe.recover.generate if recipe.recover is not None else None
    if g is None:
        return None
    from moeprune.evaluate.vllm_backend import resolve_backend

    return resolve_backend(g.engine, device.type, option="recover.generate.engine")


def _check_generate(recipe, config) -> None:
    """recover.generate's prompt plus continuation must fit the model's context."""
    g = recipe.recover.generate if recipe.recover is not None else None
    ctx = _context(config)
    if g is None or not ctx:
        return
    if g.prompt_tokens >= ctx:
        raise MoePruneError(f"recover.generate.prompt_tokens: {g.prompt_tokens} tokens leave no room to write in the "
                            f"model's context of {ctx} (max_position_embeddings); use at most {ctx - 1}")
    if g.max_new_tokens is not None and g.prompt_tokens + g.max_new_tokens > ctx:
        raise MoePruneError(f"recover.generate.max_new_tokens: {g.prompt_tokens} prompt tokens + {g.max_new_tokens} "
                            f"new tokens is beyond the model's context of {ctx} (max_position_embeddings); use at "
                            f"most {ctx - g.prompt_tokens}")


def _calibration(recipe, config):
    from moeprune.pipeline.recipe import calibration_spec

    _check_context(recipe, config)
    return calibration_spec(recipe, context=_context(config))


def make_plan(recipe, *, out_dir=None, overwrite: bool = False, needs_output: bool = True,
              observe_only: bool = False, collect: tuple[str, ...] = (), inputs=(),
              processes: int | None = None) -> "Plan":
    """Validate the recipe against the model's config and decide everything that needs no weights.

    `observe_only`: the plan of `moeprune observe` (statistics `collect`, no method, no compression).
    `inputs`: files and folders the command reads besides those the recipe names (the recipe file itself,
    an observations folder); the output may be none of them, nor hold or sit inside one. `processes`: plan as
    that many torchrun processes (default: the launcher's WORLD_SIZE, 1 without one)."""
    from moeprune.checkpoint import OutputFolder
    from moeprune.checkpoint.model_dir import meta_model, resolve_model_dir
    from moeprune.methods import get_method
    from moeprune.models import MoEAdapter

    src = resolve_model_dir(recipe.model)
    out = out_dir or recipe.output
    output = None
    if needs_output:
        if not out:
            raise MoePruneError("no output folder: pass -o OUT or set 'output' in the recipe")
        output = OutputFolder(out, inputs=(src, recipe.keep_file, *inputs), overwrite=overwrite)
    shape = MoEAdapter(meta_model(src))
    where = placement(src, shape.model, dtype=recipe.dtype, device=recipe.device, execution=recipe.execution,
                      max_memory=recipe.max_memory)
    method = get_method(recipe.method, where="method")
    plan = Plan(recipe=recipe, src=src, shape=shape, method=method, n_keep=None, dtype=where.dtype,
                source_dtype=where.source_dtype, device=where.device, execution=where.execution,
                execution_reason=where.reason, model_bytes=where.model_bytes, max_memory=where.max_memory,
                output=output, processes=processes or distributed.launched_processes())
    parse_memory(recipe.max_shard_size, field_name="max_shard_size")
    if observe_only:
        from moeprune.observe.collector import OPTIONAL_STATS

        unknown = sorted(set(collect) - set(OPTIONAL_STATS))
        if unknown:
            raise MoePruneError(f"--collect: unknown statistic {unknown[0]!r}; available: {', '.join(OPTIONAL_STATS)}")
        plan.collect = tuple(collect)
        plan.calibration = _calibration(recipe, shape.config)
        _check_inputs(plan)
        return plan
    plan.n_keep = _check_ratio(recipe, shape)
    method.check(plan)
    plan.collect = tuple(method.needs)
    _check_recover(recipe, shape, plan.execution)
    _check_recover_memory(plan)
    plan.generate_engine = generate_engine(recipe, plan.device)
    if method.needs_observations or method.needs_layer_inputs or recipe.recover is not None:
        plan.calibration = _calibration(recipe, shape.config)
    plan.quant_group_size = _quantize(recipe, shape, plan.execution)
    _check_quantize_memory(plan)
    if recipe.eval.tasks:
        from moeprune.evaluate import resolve_tasks

        plan.tasks = resolve_tasks(recipe.eval.tasks)
        from moeprune.evaluate.vllm_backend import resolve_backend

        plan.eval_backend = resolve_backend(recipe.eval.backend, plan.device.type, option="eval.backend")
    _check_inputs(plan)
    return plan


def _check_inputs(plan: "Plan") -> None:
    """The output must not be, hold or sit inside the calibration and task files either (known only now)."""
    if plan.output is None:
        return
    from moeprune.evaluate.tasks import task_files

    calib = [Path(s.name).expanduser() for s in getattr(plan.calibration, "sources", ()) or ()
             if Path(s.name).expanduser().exists()]
    plan.output.add_inputs(*calib, *task_files(plan.tasks or ()))
