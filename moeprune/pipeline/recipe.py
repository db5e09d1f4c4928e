"""Recipes: the YAML that drives `moeprune run`, validated with pydantic.

Every field is documented in `docs/recipes.md`. Unknown fields are errors (a typo fails loudly), and
every error names the file, the field and the allowed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import math

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeprune.errors import MoePruneError
from moeprune.inputs import read_text

__all__ = ["Recipe", "RecoverConfig", "CalibrationConfig", "EvalConfig", "load_recipe", "apply_overrides", "format_validation_error",
           "calibration_spec", "DEFAULT_MAX_LENGTH"]

DEFAULT_MAX_LENGTH = 512  # calibration rows, when the recipe sets no max_length and the model allows it

_FORBID = ConfigDict(extra="forbid")

# Ranges of the numeric fields (docs/recipes.md lists them). Upper bounds are far above any useful value and
# exist so that a typo (an extra zero, 1e30, .inf) fails here instead of running for days or overflowing.
SEED_MAX = 2**32 - 1  # every seed consumer (torch, numpy, random) accepts [0, 2**32)
BATCH_MAX = 4096  # sequences / continuations per forward pass
TOKENS_MAX = 10**9  # token counts (training tokens, tokens per batch or step)
LENGTH_MAX = 2**20  # tokens per sequence (also checked against the model's context)
STEPS_MAX = 10**6
LR_MAX = 10.0
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 100.0
SAMPLES_MAX = 1000
EXPERTS_MAX = 65536
LIMIT_MAX = 10**7


class _Section(BaseModel):
    """Base of every recipe section: unknown fields are errors, and a boolean is not a number."""

    model_config = _FORBID

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, v, info):
        if isinstance(v, bool):
            ann = cls.model_fields[info.field_name].annotation
            if bool not in _leaf_types(ann) and (int in _leaf_types(ann) or float in _leaf_types(ann)):
                raise ValueError(f"expected a number, got {str(v).lower()}")
        return v


def _leaf_types(ann) -> set:
    from typing import get_args

    args = get_args(ann)
    if not args:
        return {ann}
    out = set()
    for a in args:
        out |= _leaf_types(a)
    return out


class CalibrationConfig(_Section):
    model_config = _FORBID
    spec: str | None = Field(None, description="SOURCE[:N],... (see docs/calibration.md); empty = built-in set")
    max_length: int | None = Field(None, ge=2, le=LENGTH_MAX,
        description="tokens per sequence; default 512, or the model's "
                    "context when shorter")
    batch_size: int = Field(8, ge=1, le=BATCH_MAX)
    pack: bool = True
    chat_template: bool = False
    text_field: str = "text"


class EvalConfig(_Section):
    model_config = _FORBID
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1, le=LIMIT_MAX)
    batch_size: int = Field(16, ge=1, le=BATCH_MAX)
    base: bool = Field(True, description="also evaluate the uncompressed model")
    backend: Literal["hf", "vllm", "auto"] = Field(
        "hf", description="hf: transformers; vllm: vLLM's offline engine on each model folder (docs/evaluation.md); "
                          "auto: vLLM when installed and its build runs on the device")


class MergeConfig(_Section):
    model_config = _FORBID
    linkage: Literal["average", "single", "complete", "ward"] = "average"
    router: Literal["dominant", "weighted"] = "dominant"
    align: bool | None = Field(None, description="align neurons before averaging (default: m_smoe yes, hc_smoe no)")
    all_means_tokens: int | None = Field(256, ge=1, le=TOKENS_MAX,
        description="tokens per batch for hc_smoe features and ream "
                    "similarities; null = all")
    group_size: int = Field(0, ge=0, le=EXPERTS_MAX,
        description="ream: 0 = every expert joins its most similar centroid; C > 0 = "
                    "REAM's pseudo-pruning groups of at most C experts (the paper: 16)")


class ReconstructConfig(_Section):
    model_config = _FORBID
    budget: int = Field(5000, ge=1, le=10**7, description="max subsets per layer for the exact search, greedy beyond")
    max_tokens: int = Field(2048, ge=1, le=TOKENS_MAX, description="calibration tokens cached per layer")


class QuantizeConfig(_Section):
    model_config = _FORBID
    bits: Literal[4, 8] = 8
    group_size: Annotated[int, Field(ge=1, le=EXPERTS_MAX)] | Literal["auto", "channel"] = Field(
        "auto", description="weights per scale (uniform mode): an integer dividing every quantized width, "
                            "'channel' (one scale per row) or 'auto' (largest of 128/64/32 that divides, else channel)")
    mixed_budget: float | None = Field(None, ge=4, le=16, allow_inf_nan=False,
        description="average bits per expert weight: importance-aware "
                    "per-layer mix (needs bits: 8)")
    importance: str = Field("reap", description="scoring method giving each layer's importance for the mix")
    method: Literal["rtn", "gptq"] = Field("rtn", description="uniform mode: rtn (round to nearest) or gptq (from "
                                                              "the recipe's calibration batches)")
    damp: float = Field(0.01, gt=0, le=1, allow_inf_nan=False,
                        description="gptq: dampening, a fraction of mean(diag H)")
    act_order: bool = Field(False, description="gptq: quantize columns by descending Hessian diagonal")
    block_size: int = Field(128, ge=1, le=65536, description="gptq: columns per block")
    min_expert_tokens: int = Field(32, ge=0, le=10**9,
                                   description="gptq: routed experts with fewer calibration tokens are rounded to "
                                               "nearest")

    @model_validator(mode="after")
    def _gptq_is_uniform(self) -> "QuantizeConfig":
        if self.method == "gptq" and self.mixed_budget is not None:
            raise ValueError("method gptq applies to uniform quantization; mixed_budget is float8 per layer and "
                             "uses no calibration (drop one of them)")
        return self


RECOVER_TRAINS = {"router_kd": "router", "router_kd_block": "router", "moe_kd": "moe", "moe_kd_block": "moe",
                  "none": None}
# steps, learning rate and tokens when the recipe gives none: the router has a few E x H matrices per layer; the
# whole MoE block (experts too) has far more weights and needs a smaller step, more of them and more data (on
# the study model 16k tokens left it at 39% of base, 104k at 74%: docs/study.md)
# (method none trains nothing; its tokens bound the held-back measurement as for router_*)
RECOVER_DEFAULTS = {"router": {"steps": 100, "lr": 1e-3, "tokens": 16384},
                    "moe": {"steps": 400, "lr": 3e-4, "tokens": 131072}}
# moe_kd with adapter: lora trains low-rank factors (B starts at zero), which need a larger step than the weights
ADAPTER_LR = 1e-3
ADAPTER_RANK = 16  # moeprune.recover.adapters.DEFAULT_RANK
RANK_MAX = 65536


class GenerateConfig(_Section):
    """Logit KD also on text the original model writes (moeprune.recover.generate)."""
    model_config = _FORBID
    samples: int = Field(4, ge=1, le=SAMPLES_MAX,
        description="continuations of each training calibration row (fewer when "
                    "recover.tokens is reached first)")
    prompt_tokens: int = Field(4, ge=1, le=LENGTH_MAX,
        description="tokens of each calibration row the continuation starts from")
    max_new_tokens: int | None = Field(None, ge=1, le=LENGTH_MAX,
        description="tokens written per continuation; default: the "
                    "calibration max_length less prompt_tokens")
    temperature: float = Field(1.0, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX, allow_inf_nan=False,
        description="sampling temperature (1: the model's own distribution)")
    batch_size: int = Field(32, ge=1, le=BATCH_MAX, description="continuations sampled at once")
    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="who samples: vllm (its offline engine on the source folder), hf (the loaded model, "
                            "moeprune's own sampler), auto: vLLM when it is installed and runs on this device")


class RecoverConfig(_Section):
    model_config = _FORBID
    method: Literal["router_kd", "router_kd_block", "moe_kd", "moe_kd_block", "none"] = Field(
        "router_kd", description="router_kd: train only the router tensors against the original model's next-token "
                                 "distribution (in memory); router_kd_block: per MoE layer, train only its router so "
                                 "the block's output matches the original block's (in memory or layer-wise); "
                                 "moe_kd / moe_kd_block: the same two objectives training every weight of the MoE "
                                 "blocks (router, surviving experts, shared experts); none: no training (with "
                                 "gate_scale)")
    steps: int | None = Field(None, ge=1, le=STEPS_MAX,
        description="optimizer steps (logit KD: one calibration batch each; "
                    "*_block: per MoE layer, batch_tokens tokens each); default "
                    "100 for router_*, 400 for moe_*")
    lr: float | None = Field(None, gt=0, le=LR_MAX, allow_inf_nan=False,
        description="Adam learning rate; default 1e-3 for router_*, 3e-4 for moe_*")
    tokens: int | None = Field(None, ge=1, le=TOKENS_MAX,
        description="calibration tokens to train on (whole batches; the last "
                    "eighth of the calibration batches is held back to measure "
                    "the result); default 16384 for router_*, 131072 for moe_*")
    top_k: int = Field(64, ge=1, le=LENGTH_MAX,
        description="router_kd / moe_kd: teacher log-probabilities kept per token "
                    "(>= vocabulary: full KL)")
    batch_tokens: int = Field(512, ge=1, le=TOKENS_MAX, description="*_block: tokens per optimizer step")
    gate_scale: Literal["keep", "auto", "renormalize", "no_renormalize"] = Field(
        "keep", description="whether the surviving top-k gates are renormalised (config flag such as "
                            "norm_topk_prob): keep the source's setting, auto = measure both on held-back "
                            "calibration tokens and keep the closer, or force one")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="batch-order seed; default: the recipe's seed")
    generate: GenerateConfig | None = Field(
        None, description="router_kd / moe_kd: also train on the original model's own continuations of the "
                          "training calibration rows, up to `tokens` in all (docs/methods.md)")

    adapter: Literal["none", "lora"] = Field(
        "none", description="moe_kd: none = train every MoE-block weight; lora = keep the MoE-block matrices "
                            "frozen and train low-rank factors of every routed and shared expert matrix (the "
                            "routers train fully), merged back into the stock tensors (docs/scale.md)")
    parallel: Literal["auto", "data", "sharded"] = Field(
        "auto", description="router_kd / moe_kd in memory under torchrun: data = every rank holds the model, its "
                            "float32 masters and gradients and trains its share of each step's rows (Adam's moments "
                            "sharded); sharded = moe_kd's MoE-block parameters, gradients and Adam moments sharded "
                            "over the ranks by torch FSDP2; auto = data when it fits max_memory, else sharded "
                            "(docs/distributed.md)")
    rank: int = Field(ADAPTER_RANK, ge=1, le=RANK_MAX, description="adapter: lora: rank R of the factors")
    alpha: float | None = Field(None, gt=0, le=1e6, allow_inf_nan=False,
                                description="adapter: lora: the factors' product is scaled by alpha / rank; "
                                            "default 2 x rank")

    @field_validator("generate", mode="before")
    @classmethod
    def _samples_shorthand(cls, v):
        return {"samples": v} if isinstance(v, int) and not isinstance(v, bool) else v  # generate: 4

    @model_validator(mode="after")
    def _does_something(self) -> "RecoverConfig":
        self._check_adapter()
        if self.method == "none" and self.gate_scale == "keep":
            raise ValueError("method none with gate_scale keep does nothing; set gate_scale: auto (or renormalize, "
                             "no_renormalize), or a training method")
        if self.generate is not None and not self.logit_kd:
            raise ValueError(f"generate applies to router_kd and moe_kd (KD on the model's output), not to "
                             f"{self.method}; remove recover.generate or use one of those methods")
        defaults = RECOVER_DEFAULTS[self.trains or "router"]
        if self.steps is None:
            self.steps = defaults["steps"]
        if self.lr is None:
            self.lr = ADAPTER_LR if self.adapter == "lora" else defaults["lr"]
        if self.tokens is None:
            self.tokens = defaults["tokens"]
        return self

    def _check_adapter(self) -> None:
        if self.adapter == "lora" and self.method != "moe_kd":
            hint = ("router_kd trains only the routers already" if self.method == "router_kd" else
                    f"{self.method} has no adapter variant")
            raise ValueError(f"adapter lora applies to method moe_kd; {hint}: use method: moe_kd or adapter: none")
        unused = sorted({"rank", "alpha"} & self.model_fields_set)
        if self.adapter == "none" and unused:
            raise ValueError(f"{unused[0]} applies to adapter: lora; set adapter: lora or remove {unused[0]}")

    @property
    def trains(self) -> str | None:
        """What the method trains: "router", "moe" (every MoE-block weight) or None."""
        return RECOVER_TRAINS[self.method]

    @property
    def per_block(self) -> bool:
        """True for the block-output objective (one MoE layer at a time), False for logit KD."""
        return self.method.endswith("_block")

    @property
    def full_moe_kd(self) -> bool:
        """True for moe_kd training every MoE-block weight (no adapter): what sharding (recover.parallel) splits."""
        return self.method == "moe_kd" and self.adapter == "none"

    @property
    def logit_kd(self) -> bool:
        """True for training against the original model's next-token distribution (router_kd, moe_kd)."""
        return self.trains is not None and not self.per_block

    @property
    def trains_per_block(self) -> bool:
        """True for training one MoE block at a time (router_kd_block, moe_kd_block)."""
        return self.trains is not None and self.per_block


class Recipe(_Section):
    model_config = _FORBID
    model: str = Field(..., description="local model folder, or 'demo'")
    method: str = "reap"
    ratio: float | None = Field(None, description="fraction of experts to drop per layer, in (0, 1)")
    keep: int | None = Field(None, ge=1, le=EXPERTS_MAX, description="experts to keep per layer (instead of ratio)")
    keep_file: str | None = Field(None, description="KEEP.json ({layer: [experts]}) for method keep_file")
    allocation: Literal["uniform", "global"] = "uniform"
    protect_super_experts: bool = True
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    reconstruct: ReconstructConfig = Field(default_factory=ReconstructConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    quantize: QuantizeConfig | None = Field(None, description="optional weight-only quantization after compression")
    recover: RecoverConfig | None = Field(None, description="optional recovery training after compression")
    output: str | None = None
    seed: int = Field(0, ge=0, le=SEED_MAX, description="calibration sampling, the random method, recovery batch order")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="compute dtype; auto = the checkpoint's own (outputs always keep the source dtype)")
    device: str = Field("auto", description="cpu, cuda, cuda:N; auto = CUDA when available")
    execution: Literal["auto", "memory", "layerwise"] = Field(
        "auto", description="memory: load the whole model; layerwise: one decoder layer at a time; auto: "
                            "layerwise when the model does not fit in max_memory")
    max_memory: int | str | None = Field(None, description="memory budget, e.g. 24GB (accelerate's convention); "
                                                           "default: free memory of the device")
    max_shard_size: int | str = Field("5GB", description="largest output safetensors file")

    @field_validator("ratio")
    @classmethod
    def _ratio_range(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v < 1:
            raise ValueError(f"must be in (0, 1), the fraction of experts to drop; got {v}")
        return v

    @field_validator("max_memory", "max_shard_size", mode="before")
    @classmethod
    def _finite_size(cls, v):
        # the plan parses sizes (units.parse_memory: units, positive); NaN/Infinity would overflow there
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"must be a finite size such as 24GB, 500MiB or a byte count; got {_shown(v)}")
        return v

    @model_validator(mode="after")
    def _ratio_or_keep(self) -> "Recipe":
        if self.method == "keep_file" or self.keep_file is not None:
            if self.keep_file is None or self.method != "keep_file":
                raise ValueError("method keep_file and keep_file: KEEP.json go together")
            if self.ratio is not None or self.keep is not None:
                raise ValueError("keep_file gives the experts to keep; drop 'ratio' and 'keep'")
            return self
        if (self.ratio is None) == (self.keep is None):
            raise ValueError("give exactly one of 'ratio' (fraction of experts to drop) or 'keep'")
        return self

    @model_validator(mode="after")
    def _known_method(self) -> "Recipe":
        from moeprune.methods import method_names

        if self.method not in method_names():
            raise ValueError(f"method: unknown method {self.method!r}; allowed: {', '.join(method_names())}")
        return self


def format_validation_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in _RANGE_ERRORS:
        return f"{source}: field '{loc}': {_range_message(err)}; got {_shown(err.get('input'))}"
    if any(_is_union_tag(p) for p in err["loc"]):  # int | literal: say every allowed form
        same = [e for e in exc.errors() if [p for p in e["loc"] if not _is_union_tag(p)] ==
                [p for p in err["loc"] if not _is_union_tag(p)]]
        forms = []
        for e in same:
            numeric = e["type"] in _RANGE_ERRORS or e["type"].startswith(("int_", "float_"))
            forms.append(_range_message(e).removeprefix("must be ") if numeric else
                         e["msg"].removeprefix("Input should be "))
        return f"{source}: field '{loc}': must be {' or '.join(forms)}; got {_shown(err.get('input'))}"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_fields(err["loc"])
        return f"{source}: unknown field '{loc}'; allowed fields: {allowed}"
    if err["type"] == "literal_error":
        return f"{source}: field '{loc}': {msg}"
    if err["type"] == "missing":
        return f"{source}: field '{loc}' is required"
    return f"{source}: field '{loc}': {msg}" if err["loc"] else f"{source}: {msg}"


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number")


def _is_union_tag(part) -> bool:
    """pydantic adds the member's name ('int', 'constrained-int', "literal['auto','channel']") to a union's loc."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool") or part.startswith(("constrained-",
                                                                                              "literal[")))


def _shown(value) -> str:
    if isinstance(value, float):
        return "NaN" if math.isnan(value) else repr(value).replace("inf", "Infinity")
    return repr(value)


def _range_message(err: dict) -> str:
    """'must be ...' with the allowed range of the field (see the *_MAX constants)."""
    field = _field_info(err["loc"])
    lo = hi = None
    lo_open = hi_open = False
    for m in getattr(field, "metadata", ()) if field is not None else ():
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_open = m.gt, True
        if getattr(m, "le", None) is not None:
            hi = m.le
        if getattr(m, "lt", None) is not None:
            hi, hi_open = m.lt, True
    if lo is None and hi is None:
        return err["msg"].lower().replace("input should be", "must be")
    is_int = all(isinstance(b, int) for b in (lo, hi) if b is not None) and err["type"] != "finite_number"
    kind = "an integer" if is_int else "a finite number"
    if lo is not None and hi is not None:
        return f"must be {kind} in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"must be {kind} {'>' if lo_open else '>='} {_num(lo)}"
    return f"must be {kind} {'<' if hi_open else '<='} {_num(hi)}"


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _field_info(loc: tuple):
    """The pydantic FieldInfo at `loc` (section fields included; union members give the member's metadata)."""
    model: type[BaseModel] = Recipe
    info = None
    for part in loc:
        if _is_union_tag(part) and info is not None:
            from typing import get_args

            for member in get_args(info.annotation):
                extra = [m for m in getattr(member, "__metadata__", ()) if hasattr(m, "metadata")]
                if extra:
                    return extra[0]
            return info
        info = model.model_fields.get(str(part)) if model is not None else None
        if info is None:
            return None
        sub = _section_type(info.annotation)
        model = sub
    return info


def _section_type(ann):
    """The recipe section class of a field annotation (`X | None` included), else None."""
    from typing import get_args

    for a in (ann, *get_args(ann)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _allowed_fields(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        sub = model.model_fields.get(str(part))
        if sub is None or not isinstance(sub.annotation, type) or not issubclass(sub.annotation, BaseModel):
            break
        model = sub.annotation
    return ", ".join(model.model_fields)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str], *, source: str = "--set") -> dict:
    """Apply `key.sub=value` strings (values parsed as YAML) to a recipe dict."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoePruneError(f"{source} {item!r}: expected KEY=VALUE, e.g. --set ratio=0.25")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MoePruneError(f"{source} {item!r}: '{part}' is not a section")
        node[parts[-1]] = _parse_value(value)
        if parts[-1] == "ratio":
            node.pop("keep", None)
        elif parts[-1] == "keep":
            node.pop("ratio", None)
    return data


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file; errors are one line naming file and field."""
    path = Path(path)
    text = read_text(path, what="recipe")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise MoePruneError(f"{path}: malformed YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise MoePruneError(f"{path}: a recipe is a mapping of fields (model, method, ratio, ...)")
    data = apply_overrides(data, list(overrides))
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise MoePruneError(format_validation_error(str(path), exc)) from None


def calibration_spec(recipe: Recipe, *, context: int | None = None):
    """The recipe's calibration spec; an unset max_length is 512 tokens, or the model's `context` if shorter."""
    from moeprune.observe.calibration import parse_calibration_spec

    c = recipe.calibration
    max_length = c.max_length or (min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH)
    return parse_calibration_spec(c.spec, max_length=max_length, pack=c.pack, seed=recipe.seed,
                                  chat_template=c.chat_template, text_field=c.text_field)
