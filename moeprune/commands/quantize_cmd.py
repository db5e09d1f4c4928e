"""`moeprune quantize`: weight-only 4/8-bit quantization, uniform or importance-aware mixed per layer."""

from __future__ import annotations

import math
from pathlib import Path

import click

from moeprune.commands.pipeline_cmds import calibration_options
from moeprune.errors import MoePruneError

__all__ = ["quantize_cmd", "parse_number", "layer_importance"]


def parse_number(text: str | None, *, option: str, integer: bool = False) -> float | int | None:
    """A user's number, or a one-line error naming the option."""
    if text is None:
        return None
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise MoePruneError(f"{option} must be {kind}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise MoePruneError(f"{option} must be positive, got {text!r}")
    return value


def layer_importance(obs_dir: str, *, method: str, model) -> dict[int, float]:
    """{layer: sum of the experts' scores} from saved observations (never-routed experts count 0)."""
    from moeprune.observe.stats import Observations
    from moeprune.score import score_layer

    obs = Observations.load(obs_dir)
    obs.check_model(model, where=str(obs_dir))
    out = {}
    for index, stats in obs.layers.items():
        scores = score_layer(method, stats, layer=index)
        out[index] = float(scores.masked_fill(~scores.isfinite(), 0.0).clamp(min=0).sum())
    return out


def _widths(text: str) -> tuple[int, ...]:
    """--mixed-widths: two or more of 4, 8, 16 (16: dense), comma-separated."""
    try:
        widths = tuple(sorted({int(w) for w in text.split(",") if w.strip()}))
    except ValueError:
        widths = ()
    if len(widths) < 2 or not set(widths) <= {4, 8, 16}:
        raise MoePruneError(f"--mixed-widths {text!r}: give two or more of 4, 8 and 16 (dense), e.g. 4,16")
    return widths


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


GPTQ_DEFAULTS = {"damp": 0.01, "block_size": 128, "min_tokens": 32}


@click.command("quantize")
@click.argument("model_dir")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(), help="Folder to write (new or empty).")
@click.option("--bits", default="4", show_default=True, help="Weight width: 4 or 8.")
@click.option("--group-size", default="auto", show_default=True,
              help="Weights per scale (uniform mode): an integer, 'channel' (one scale per row), or 'auto' "
                   "(the largest of 128/64/32 dividing every quantized width, else 'channel').")
@click.option("--method", "quant_method", default="rtn", show_default=True,
              help="Uniform mode: rtn (round to nearest) or gptq (from calibration data, --calib; "
                   "docs/quantization.md).")
@click.option("--damp", default=None, help="GPTQ dampening, a fraction of mean(diag H) in (0, 1] [default: 0.01].")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns by descending Hessian diagonal.")
@click.option("--block-size", default=None, help="GPTQ: columns per block [default: 128].")
@click.option("--min-expert-tokens", default=None,
              help="GPTQ: routed experts with fewer calibration tokens are rounded to nearest [default: 32].")
@click.option("--mixed-budget", "avg_bits", default=None,
              help="Mixed precision: average bits per routed-expert weight (scales included).")
@click.option("--max-bytes", default=None, help="Mixed precision: total bytes allowed for all weights.")
@click.option("--mixed-format", default="float8", show_default=True,
              help="Mixed precision storage: float8 (torchao float8 or dense per MoE layer; transformers reloads it) "
                   "or packed (int4 / int8 / dense per MoE layer as compressed-tensors config groups; vLLM serves "
                   "it, transformers cannot load it).")
@click.option("--mixed-widths", default="4,8,16", show_default=True,
              help="--mixed-format packed: the widths a layer's experts may get (16 = dense); vLLM's CPU build "
                   "serves 4,16.")
@click.option("--observations", "obs_dir", type=click.Path(), default=None,
              help="Saved observations (moeprune observe): the importance that drives mixed precision.")
@click.option("--importance-method", "method", default="reap", show_default=True,
              help="Scoring method for the mixed-precision importance.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@calibration_options
def quantize_cmd(model_dir: str, out_dir: str, bits: str, group_size: str, quant_method: str, damp: str | None,
                 act_order: bool, block_size: str | None, min_expert_tokens: str | None, avg_bits: str | None,
                 max_bytes: str | None, mixed_format: str, mixed_widths: str, obs_dir: str | None, method: str,
                 overwrite: bool, device: str, execution: str, max_memory: str | None, dtype: str, **calib) -> None:
    """Quantize the weights of MODEL_DIR (experts included) into a checkpoint stock transformers reloads.

    Uniform: every expert and linear layer at --bits (compressed-tensors pack-quantized), rounded to
    nearest (--method rtn) or with GPTQ from calibration data (--method gptq, --calib as for observe);
    routers, shared-expert gates and lm_head stay in the source dtype. Mixed (--mixed-budget or
    --max-bytes, with --observations): each MoE layer's experts float8 or dense, the most important layers
    kept dense within the budget (transformers-only: vLLM refused it as tested, see docs/serving.md); with
    --mixed-format packed, int4 / int8 / dense per MoE layer in compressed-tensors (vLLM-only).
    """
    from moeprune.compress.quantize import (METHODS, SUPPORTED_BITS, MixedBudget, quantize_model, save_quantized,
                                            serving_note)
    from moeprune.compress.quantize_plan import check_quantize, parse_group_size
    from moeprune.checkpoint.writer import check_output_dir, portable_path
    from moeprune.checkpoint.model_dir import load_model, meta_model, resolve_model_dir

    n_bits = parse_number(bits, option="--bits", integer=True)
    if n_bits not in SUPPORTED_BITS:
        raise MoePruneError(f"--bits {bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    if quant_method not in METHODS:
        raise MoePruneError(f"--method {quant_method!r} is not a quantization method; choose one of "
                            f"{', '.join(METHODS)} (the mixed-precision scorer is --importance-method)")
    gptq = _gptq_options(quant_method, damp=damp, act_order=act_order, block_size=block_size,
                         min_tokens=min_expert_tokens, calib=calib)
    group = parse_group_size(group_size)
    mixed = None
    if avg_bits is not None or max_bytes is not None:
        if quant_method == "gptq":
            raise MoePruneError("--method gptq applies to uniform quantization; mixed precision (--mixed-budget, "
                                "--max-bytes) is float8 per layer and uses no calibration")
        mixed = MixedBudget(avg_bits=parse_number(avg_bits, option="--mixed-budget"),
                            max_bytes=parse_number(max_bytes, option="--max-bytes", integer=True))
        if obs_dir is None:
            raise MoePruneError("mixed precision needs --observations DIR (from `moeprune observe`) for importance")
    if mixed_format not in ("float8", "packed"):
        raise MoePruneError(f"--mixed-format {mixed_format!r}: choose float8 or packed")
    widths = _widths(mixed_widths) if mixed is not None and mixed_format == "packed" else None
    src = resolve_model_dir(model_dir)
    calib_spec = _calibration_spec(src, calib) if gptq is not None else None
    check_output_dir(out_dir, inputs=(src, obs_dir, *_calib_paths(calib_spec)), overwrite=overwrite)
    where = _placement(src, device, execution, max_memory, dtype)
    if mixed is None:  # group size against every quantized width, before any weight is read
        group = check_quantize(meta_model(src), n_bits, group)
    calibration = None
    if calib_spec is not None:
        from moeprune.checkpoint.model_dir import load_tokenizer
        from moeprune.observe.calibration import load_calibration

        calibration = load_calibration(calib_spec, load_tokenizer(src), batch_size=calib["batch_size"])
        click.echo(f"calibration: {calibration.num_sequences} sequences, {calibration.num_tokens:,} tokens", err=True)
    model = load_model(src, dtype=where.source_dtype, device=str(where.device))
    importance = layer_importance(obs_dir, method=method, model=model) if mixed is not None else None
    result = quantize_model(model, bits=n_bits, group_size=group, mixed=mixed, importance=importance,
                            method=quant_method, calibration=None if calibration is None else calibration.batches,
                            gptq=gptq, log=lambda line: click.echo(line, err=True), mixed_format=mixed_format,
                            widths=widths)
    provenance = {"base_model": portable_path(src), "method": "quantize",
                  "importance_method": method if mixed else None}
    if calibration is not None:
        provenance["calibration"] = _calibration_record(calibration)
    out = save_quantized(model, result, out_dir, source_dir=src, provenance=provenance, overwrite=overwrite,
                         inputs=(obs_dir, *_calib_paths(calib_spec)))
    before, after = _disk_bytes(src), _disk_bytes(out)
    widths = sorted(set(result.layer_bits.values()))
    click.echo(f"{result.format}{_grouping(result)}, {result.method}: layer widths {widths}, safetensors "
               f"{before:,} -> {after:,} bytes ({after / max(before, 1):.1%}) -> {out}")
    click.echo(f"serves in: {serving_note(result)}")


def _gptq_options(quant_method: str, *, damp, act_order: bool, block_size, min_tokens, calib: dict):
    """GPTQOptions for --method gptq; GPTQ-only flags with --method rtn are refused."""
    from moeprune.compress.gptq import GPTQOptions

    given = {"--damp": damp is not None, "--act-order": act_order, "--block-size": block_size is not None,
             "--min-expert-tokens": min_tokens is not None, "--calib": calib.get("calib") is not None}
    if quant_method != "gptq":
        extra = [flag for flag, on in given.items() if on]
        if extra:
            raise MoePruneError(f"{extra[0]} applies to --method gptq only")
        return None
    damp_value = GPTQ_DEFAULTS["damp"] if damp is None else parse_number(damp, option="--damp")
    if damp_value > 1:
        raise MoePruneError(f"--damp must be in (0, 1], got {damp!r}")
    blocks = GPTQ_DEFAULTS["block_size"] if block_size is None else parse_number(block_size, option="--block-size",
                                                                                 integer=True)
    if min_tokens is None:
        minimum = GPTQ_DEFAULTS["min_tokens"]
    else:
        try:
            minimum = int(min_tokens)
        except ValueError:
            minimum = -1
        if minimum < 0 or str(minimum) != str(min_tokens).strip():
            raise MoePruneError(f"--min-expert-tokens must be an integer >= 0, got {min_tokens!r}")
    return GPTQOptions(damp=float(damp_value), act_order=act_order, block_size=int(blocks), min_tokens=minimum)


def _calibration_spec(src, calib: dict):
    """The calibration spec from the flags `observe` takes; bad sources fail here, before any weight is read."""
    from moeprune.checkpoint.model_dir import load_config
    from moeprune.observe.calibration import parse_calibration_spec
    from moeprune.pipeline.recipe import DEFAULT_MAX_LENGTH

    ctx = getattr(load_config(src), "max_position_embeddings", None)
    ctx = ctx if isinstance(ctx, int) and ctx > 0 else None
    max_length = calib.get("max_length")
    if max_length is not None and ctx and max_length > ctx:
        raise MoePruneError(f"--max-length {max_length} is beyond the model's context of {ctx} "
                            f"(max_position_embeddings); use at most {ctx}")
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, ctx) if ctx else DEFAULT_MAX_LENGTH
    return parse_calibration_spec(calib.get("calib"), max_length=max_length, pack=not calib.get("no_pack"),
                                  seed=calib.get("seed", 0), chat_template=calib.get("chat_template", False),
                                  text_field=calib.get("text_field", "text"))


def _calibration_record(calibration) -> dict:
    """What calibrated GPTQ, for moeprune.json: local file sources without their absolute location."""
    from moeprune.checkpoint.writer import portable_path

    record = calibration.describe()

    def name(n: str) -> str:
        return portable_path(n) if Path(n).expanduser().is_absolute() else n

    for source in record["spec"]["sources"]:
        source["name"] = name(source["name"])
    record["source_counts"] = {name(k): v for k, v in record["source_counts"].items()}
    return record


def _calib_paths(spec) -> tuple:
    """Calibration sources that are files or folders (the output may not be one of them)."""
    if spec is None:
        return ()
    return tuple(Path(s.name).expanduser() for s in spec.sources if Path(s.name).expanduser().exists())


def _placement(src, device: str, execution: str, max_memory, dtype: str = "auto"):
    """The model loads in its own dtype; a model that does not fit in memory is refused before any weight."""
    from moeprune.checkpoint.model_dir import meta_model
    from moeprune.pipeline.plan import placement

    where = placement(src, meta_model(src), dtype=dtype, device=device, execution=execution, max_memory=max_memory)
    if where.dtype != where.source_dtype:
        raise MoePruneError(f"quantize computes in the checkpoint's own dtype ({where.source_dtype}); "
                            f"--dtype {dtype} is not supported here (use auto)")
    if where.execution == "layerwise":
        raise MoePruneError(f"quantize needs the whole model in memory ({where.reason}); quantize the pruned or "
                            "merged output instead (`moeprune prune ... -o OUT` first: it is smaller), or raise "
                            "--max-memory on a larger machine")
    return where


def _grouping(result) -> str:
    if result.strategy == "channel":
        return ", one scale per output row (channel)"
    return f", group size {result.group_size}" if result.group_size else ""
