"""The memory each recovery method needs, per process, from the model built on the meta device and the recipe:
computed before any weight is read, so the plan can refuse a recovery that cannot fit and say what would.

Per method (d = bytes per element of the compute dtype; shapes after pruning to `n_keep` experts per layer):

- **weights**: logit KD (`router_kd`, `moe_kd`) holds the whole model; the original model's targets are taken
  before surgery, so the peak is the unpruned model's bytes. Block methods under layer-wise execution hold the
  largest decoder layer; in memory, the whole model.
- **training state**: every trained parameter keeps a float32 master copy (4 B), its gradient in the compute
  dtype (d) and in float32 (4 B), and two Adam moments (8 B): (16 + d) bytes per trained parameter. Logit KD
  trains every MoE layer at once; block methods one layer at a time (the largest).
- **activations**: one training batch of T tokens (logit KD: calibration batch_size x max_length; block methods:
  recover.batch_tokens) keeps, per decoder layer it runs through, about 24 hidden-sized tensors for the backward
  pass, plus the logits in float32 with their log-softmax and gradient (3 x 4 B per vocabulary entry) for logit
  KD: T x (layers x 24 x hidden x d + 12 x vocab). An estimate of what autograd keeps, not a measurement.
- **teacher targets** (logit KD): recover.top_k log-probabilities (4 B) and token ids (8 B) per training token,
  for recover.tokens training tokens (its default when the recipe leaves it unset).

`moe_kd` with `recover.adapter: lora` (recover/adapters.py) at rank R: weights and targets as for `moe_kd`; the
trained parameters are the router tensors (kept rows), the small tensors trained fully (per-expert biases, a
shared expert's one-output gate) and R x (m + n) factor elements for every adapted (m, n) matrix: each kept
routed expert's gate_up and down matrices and each shared-expert linear. State is counted at (16 + d) bytes per
trained parameter as above (the float32 factors train without a separate master: 16 B, so this is an upper
bound for them). Activations: the logit-KD batch as above, plus what recomputing one layer's W_eff = W + scale
B A needs in the backward pass (the adapted experts run under activation checkpointing): that layer's adapted
tensors in the compute dtype (d) and 8 B per element of its largest adapted tensor (its float32 copy and B A).

Logit KD under layer-wise execution (execution/streamkd.py: frozen weights streamed from the files, what trains
resident, every decoder layer recomputed in the backward pass) instead needs (`layerwise_logit_kd`):

- **weights**: the part outside the decoder layers (embedding, final norm, head; tied tensors once), plus the
  larger of the teacher's streamed layer (3 x the largest decoder layer: the layer and its conversion copies,
  as offload.py counts them) and the student's trained tensors (after pruning) with 3 x the largest streamed
  remainder of a decoder layer (its parameters less what trains there, before pruning: an upper bound).
- **training state**: (16 + d) B per trained parameter, as above.
- **activations**: the decoder layers' inputs kept for the backward pass (T x hidden x layers x d), one layer's
  recomputation (T x 24 x hidden x d) and the logits (T x 12 x vocab).
- **teacher targets**: as above.

Under `torchrun` with N processes (recover/parallel.py, recover/sharded.py), per process:

- **data-parallel** (`recover.parallel: data`): every rank holds the whole model; float32 masters (4 B), the
  summed float32 gradient (4 B) and the model-dtype gradient (d) stay whole, Adam's moments are sharded by
  ZeroRedundancyOptimizer: (8 + d + 8 / N) B per trained parameter. Each rank runs its share of a step's rows
  (at least one row: a rank without rows runs the first at weight 0 when sharded), so activations are counted
  for ceil(batch_size / N) rows.
- **sharded** (`recover.parallel: sharded`, moe_kd only): torch FSDP2 shards every MoE block's float32
  parameters, gradients and Adam moments over the ranks: 16 / N B per trained parameter, plus the largest
  block gathered for its forward and backward (its parameters in d and their float32 gradient before the
  reduce-scatter, twice for the next block's prefetch). The MoE blocks' own weights are released once their
  shards exist, so the run peaks at the larger of the teacher phase (the whole unpruned model) and the training
  phase (the model less the released blocks, plus the state): `released` in the row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeprune.units import DTYPE_BYTES

__all__ = ["RecoveryMemory", "recovery_memory", "memory_table", "ADAM_STATE_BYTES", "SAVED_PER_LAYER",
           "recovery_label", "WEFF_TEMP_BYTES", "layerwise_logit_kd", "STREAM_COPIES", "SHARDED_STATE_BYTES",
           "ZERO_STATE_BYTES"]

ADAM_STATE_BYTES = 16  # float32 master (4) + float32 gradient (4) + two float32 moments (8), plus d for the grad
SAVED_PER_LAYER = 24  # hidden-sized tensors autograd keeps per decoder layer and token (estimate)
METHODS = ("router_kd", "moe_kd", "router_kd_block", "moe_kd_block")
WEFF_TEMP_BYTES = 8  # float32 copy of W and B @ A, per element of the largest adapted tensor of a layer
SHARDED_STATE_BYTES = 16  # float32 parameter shard (4) + its gradient (4) + two Adam moments (8), divided by N
ZERO_STATE_BYTES = 8  # float32 master (4) + summed float32 gradient (4), whole on every rank (+ d + 8 / N)


def recovery_label(method: str, adapter: str = "none", rank: int | None = None, parallel: str = "data") -> str:
    """The table's name of a recovery: the method, with its adapter and rank when it has one, and "sharded" when
    FSDP2 shards its state over the processes."""
    label = method if adapter == "none" else f"{method}+{adapter} r{rank}"
    return f"{label} sharded" if parallel == "sharded" else label


STREAM_COPIES = 3  # a streamed layer and its conversion copies (offload.py's budget)


@dataclass(frozen=True)
class RecoveryMemory:
    """Bytes one process needs for one recovery method."""

    method: str  # recovery_label(): "moe_kd", "moe_kd+lora r16", ...
    trained_params: int
    weights: int
    state: int
    activations: int
    targets: int
    released: int = 0  # bytes of `weights` freed before the training state exists (sharded: the MoE blocks)

    @property
    def total(self) -> int:
        return max(self.weights, self.weights - self.released + self.state) + self.activations + self.targets


def _numel(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _expert_params(adapter, layer) -> int:
    return sum(getattr(layer.experts, t).numel() for t in adapter.spec.layout.tensors)


def recovery_memory(adapter, *, method: str, dtype: str, n_keep: int | None, execution: str, batch_tokens: int,
                    step_tokens: int, top_k: int, target_tokens: int, lora_rank: int | None = None,
                    processes: int = 1, parallel: str = "data") -> RecoveryMemory:
    """The memory of `method` on the model `adapter` wraps (built on the meta device): see the module docstring.
    `step_tokens`: tokens of one logit-KD training batch on one process (under torchrun its share of the rows, at
    least one row: recovery_rows in pipeline/plan.py); `batch_tokens`: tokens of one block-method step;
    `target_tokens`: training tokens whose teacher targets are kept; `lora_rank`: moe_kd with LoRA adapters of
    this rank (recover.adapter: lora) instead of training every MoE-block weight; `processes`, `parallel`: logit
    KD in memory under torchrun, data-parallel or sharded (per process)."""
    from moeprune.recover.block import layer_trainable_parameters

    if lora_rank is not None:
        if method != "moe_kd":
            raise ValueError(f"adapters apply to moe_kd, not {method}")
        return _lora_memory(adapter, dtype=dtype, n_keep=n_keep, step_tokens=step_tokens, top_k=top_k,
                            target_tokens=target_tokens, rank=lora_rank, execution=execution)

    d = DTYPE_BYTES[dtype]
    config = adapter.config
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    model_params = _numel(adapter.model.parameters())
    trains = "router" if method.startswith("router") else "moe"
    trained_per_layer = {}
    for layer in adapter.layers:
        n = _numel(layer_trainable_parameters(adapter, layer, trains).values())
        if n_keep is not None:  # after pruning: the kept experts and their router rows only
            e = layer.num_experts
            router = _numel(layer_trainable_parameters(adapter, layer, "router").values())
            n -= router - router * n_keep // e
            if trains == "moe":
                experts = _expert_params(adapter, layer)
                n -= experts - experts * n_keep // e
        trained_per_layer[layer.index] = n
    block = method.endswith("_block")
    if block:
        trained = max(trained_per_layer.values())
        layers_run = 1
        tokens = batch_tokens
        weights = _largest_layer_bytes(adapter, d) if execution == "layerwise" else model_params * d
        logits = 0
        targets = 0
    elif execution == "layerwise":
        return layerwise_logit_kd(adapter, method=method, d=d, trained_per_layer=trained_per_layer,
                                  step_tokens=step_tokens, top_k=top_k, target_tokens=target_tokens)
    else:
        trained = sum(trained_per_layer.values())
        layers_run = int(config.num_hidden_layers)
        tokens = step_tokens
        weights = model_params * d
        logits = 12 * vocab
        targets = target_tokens * min(top_k, vocab) * 12
    activations = tokens * (layers_run * SAVED_PER_LAYER * hidden * d + logits)
    if parallel == "sharded" and not block:
        if method != "moe_kd":
            raise ValueError(f"sharded recovery applies to moe_kd, not {method}")
        largest = max(trained_per_layer.values())  # moe_kd trains the whole (pruned) block
        gathered = 2 * largest * (d + 4)  # a block's parameters in d and their float32 gradient, and the next one's
        state = trained * SHARDED_STATE_BYTES // processes + gathered
        return RecoveryMemory(recovery_label(method, parallel="sharded"), trained, weights, state, activations,
                              targets, released=trained * d)
    if processes > 1 and not block:  # data-parallel: masters and gradients whole, Adam's moments sharded
        state = trained * (ZERO_STATE_BYTES + d) + trained * 8 // processes
    else:
        state = trained * (ADAM_STATE_BYTES + d)
    return RecoveryMemory(method, trained, weights, state, activations, targets)


def _lora_memory(adapter, *, dtype: str, n_keep: int | None, step_tokens: int, top_k: int, target_tokens: int,
                 rank: int, execution: str = "memory") -> RecoveryMemory:
    from moeprune.recover.adapters import adapter_targets, lowrank_numel
    from moeprune.recover.block import layer_router_parameters

    d = DTYPE_BYTES[dtype]
    config = adapter.config
    hidden, vocab = int(config.hidden_size), int(config.vocab_size)
    trained, temp = 0, 0
    per_layer: dict[int, int] = {}  # trained parameters per MoE layer (factors and tensors trained fully)
    resident: dict[int, int] = {}  # parameters of the block trained fully (resident when the bases stream), unpruned
    for layer in adapter.layers:
        e = layer.num_experts
        keep = e if n_keep is None else n_keep
        routers = {path for path in layer_router_parameters(adapter, layer)}
        adapted, largest, mine, full = 0, 0, 0, 0
        for t in adapter_targets(adapter, layer, rank):
            shape = (keep, *t.shape[1:]) if t.per_expert else t.shape
            if t.lowrank:
                mine += lowrank_numel(shape, rank)
                n = math.prod(shape)
                adapted, largest = adapted + n, max(largest, n)
            else:
                n = math.prod(t.shape)
                mine += n * keep // e if (t.path in routers or t.per_expert) else n  # kept experts' rows only
                full += n
        trained += mine
        per_layer[layer.index], resident[layer.index] = mine, full
        temp = max(temp, adapted * d + largest * WEFF_TEMP_BYTES)
    if execution == "layerwise":  # the bases stream from the files with the other frozen weights
        row = layerwise_logit_kd(adapter, method="moe_kd", d=d, trained_per_layer=per_layer,
                                 step_tokens=step_tokens, top_k=top_k, target_tokens=target_tokens,
                                 resident_per_layer=resident)
        return RecoveryMemory(recovery_label("moe_kd", "lora", rank), row.trained_params, row.weights, row.state,
                              row.activations + temp, row.targets)
    weights = _numel(adapter.model.parameters()) * d
    state = trained * (ADAM_STATE_BYTES + d)
    activations = step_tokens * (int(config.num_hidden_layers) * SAVED_PER_LAYER * hidden * d + 12 * vocab) + temp
    targets = target_tokens * min(top_k, vocab) * 12
    return RecoveryMemory(recovery_label("moe_kd", "lora", rank), trained, weights, state, activations, targets)


def layerwise_logit_kd(adapter, *, method: str, d: int, trained_per_layer: dict[int, int], step_tokens: int,
                       top_k: int, target_tokens: int, resident_per_layer: dict[int, int] | None = None
                       ) -> RecoveryMemory:
    """Logit KD streamed under layer-wise execution (see the module docstring); `trained_per_layer`: MoE layer
    index -> parameters trained there, after pruning; `resident_per_layer`: MoE layer index -> parameters kept
    resident there (default: what the method trains; adapters: the tensors trained fully)."""
    from moeprune.recover.block import layer_trainable_parameters

    config = adapter.config
    hidden, vocab, n_layers = int(config.hidden_size), int(config.vocab_size), int(config.num_hidden_layers)
    trains = "router" if method.startswith("router") else "moe"
    decoder = _decoder_layers(adapter.model)
    outer = _numel(adapter.model.parameters()) - _numel(decoder.parameters())
    moe = {layer.index: layer for layer in adapter.layers}
    streamed = 0
    for i, layer in enumerate(decoder):
        frozen = _numel(layer.parameters())
        if i in moe and resident_per_layer is not None:
            frozen -= resident_per_layer[i]
        elif i in moe:
            frozen -= _numel(layer_trainable_parameters(adapter, moe[i], trains).values())
        streamed = max(streamed, frozen)
    trained = sum(trained_per_layer.values())
    teacher = STREAM_COPIES * _largest_layer_bytes(adapter, d)
    student = trained * d + STREAM_COPIES * streamed * d
    weights = outer * d + max(teacher, student)
    state = trained * (ADAM_STATE_BYTES + d)
    activations = step_tokens * (n_layers * hidden * d + SAVED_PER_LAYER * hidden * d + 12 * vocab)
    targets = target_tokens * min(top_k, vocab) * 12
    return RecoveryMemory(method, trained, weights, state, activations, targets)


def _decoder_layers(model):
    return model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers


def _largest_layer_bytes(adapter, d: int) -> int:
    model = adapter.model
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    return max(_numel(layer.parameters()) for layer in layers) * d


def memory_table(rows: list[RecoveryMemory], budget: int | None) -> str:
    """The rows as a text table (GB), with whether each fits `budget`."""
    head = f"{'recovery':<18}{'trained':>14}{'weights':>10}{'state':>10}{'activ.':>10}{'targets':>10}{'total':>10}"
    lines = [head + ("  fits" if budget else "")]
    for r in rows:
        gb = lambda n: f"{n / 1e9:.2f}"  # noqa: E731
        line = (f"{r.method:<18}{r.trained_params:>14,}{gb(r.weights):>10}{gb(r.state):>10}{gb(r.activations):>10}"
                f"{gb(r.targets):>10}{gb(r.total):>10}")
        if budget:
            line += "  yes" if r.total <= budget else "  no"
        lines.append(line)
    note = "\n".join(f"{r.method}: total = max(weights, weights - {r.released / 1e9:.2f} GB of MoE blocks released "
                     "to their shards + state) + activations + targets" for r in rows if r.released)
    if note:
        lines.append(note)
    return "\n".join(lines) + ("\n(GB; budget " + f"{budget / 1e9:.2f} GB)" if budget else "\n(GB)")
