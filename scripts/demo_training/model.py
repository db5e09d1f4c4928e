"""The demo models: stock transformers configs, copying and upcycling weights, the training-time domain router
bias, saving in the shipped layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


def build_config(tok, args):
    """Stock transformers config for --arch (mixtral, qwen3_moe: routed experts only; qwen2_moe: plus a
    shared expert)."""
    common = dict(vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=args.seq_len * 2, num_experts_per_tok=args.top_k, output_router_logits=True,
                  router_aux_loss_coef=args.aux_coef, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if args.arch == "mixtral":
        from transformers import MixtralConfig
        return MixtralConfig(intermediate_size=args.inter, num_local_experts=args.experts, **common)
    if args.arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        # intermediate_size only sizes dense layers, and with mlp_only_layers=[] there are none
        return Qwen3MoeConfig(moe_intermediate_size=args.inter, intermediate_size=args.inter * args.top_k,
                              num_experts=args.experts, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], use_sliding_window=False, attention_bias=False, **common)
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(moe_intermediate_size=args.inter, intermediate_size=args.shared_inter,
                          shared_expert_intermediate_size=args.shared_inter, num_experts=args.experts,
                          norm_topk_prob=True, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
                          use_sliding_window=False, **common)


def build_model(tok, args):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_config(build_config(tok, args), experts_implementation=args.experts_impl)


def copy_matching(model, src_dir: str, log) -> None:
    """Copy every tensor whose name and shape match from the model in `src_dir` (embeddings, attention,
    norms when the shapes agree); everything else, experts and routers included, keeps its fresh init."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32).state_dict()
    copied = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name in sd and sd[name].shape == t.shape and ".mlp." not in name:
                t.copy_(sd[name])
                copied.append(name)
    log(f"copied {len(copied)} non-MoE tensors from {src_dir}: {copied}")


def upcycle(src_dir: str, tok, args, log):
    """Sparse upcycling of a trained routed-only MoE into the --arch shape.

    Every source expert is cut into --split experts along its intermediate neurons (down projection
    scaled by --split, router row copied with a little noise, so each piece starts as an equal share of
    its parent); embeddings, attention and norms are copied; a shared expert (qwen2_moe) starts with a
    zero down projection, i.e. as a no-op that training grows. Returns the new model.
    """
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    s_cfg = src.config
    n_src, i_src = s_cfg.num_local_experts, s_cfg.intermediate_size
    if i_src % args.split:
        raise SystemExit(f"--split {args.split} does not divide the source intermediate size {i_src}")
    args.experts, args.inter = n_src * args.split, i_src // args.split
    args.hidden, args.layers = s_cfg.hidden_size, s_cfg.num_hidden_layers
    args.heads, args.kv_heads = s_cfg.num_attention_heads, s_cfg.num_key_value_heads
    model = build_model(tok, args)
    sd, new = src.state_dict(), model.state_dict()
    gen = torch.Generator().manual_seed(args.seed)
    piece = args.inter
    with torch.no_grad():
        for name, t in new.items():
            if name in sd and sd[name].shape == t.shape:
                t.copy_(sd[name])
            elif name.endswith("mlp.gate.weight"):
                rows = sd[name].repeat_interleave(args.split, dim=0)
                t.copy_(rows + args.router_noise * rows.std() * torch.randn(rows.shape, generator=gen))
            elif name.endswith("mlp.experts.gate_up_proj"):
                g, u = sd[name].chunk(2, dim=1)  # (E, I, H) each
                for e in range(n_src):
                    for k in range(args.split):
                        sl = slice(k * piece, (k + 1) * piece)
                        t[e * args.split + k] = torch.cat([g[e, sl], u[e, sl]], dim=0)
            elif name.endswith("mlp.experts.down_proj"):
                for e in range(n_src):
                    for k in range(args.split):
                        t[e * args.split + k] = sd[name][e, :, k * piece:(k + 1) * piece] * args.split
            elif name.endswith("shared_expert.down_proj.weight") or name.endswith("shared_expert_gate.weight"):
                t.zero_()
            elif "shared_expert." in name:
                pass  # random init from the config
            else:
                raise SystemExit(f"upcycle: no rule for parameter {name} {tuple(t.shape)}")
    log(f"upcycled {src_dir}: {n_src} experts x {i_src} -> {args.experts} x {args.inter} ({args.arch})")
    return model


class DomainRouterBias:
    """Training-time domain affinity between domains and groups of experts.

    Experts are split into one group per domain (round-robin). Two signals, both annealed to 0 well before
    training ends (the script's schedule), make the experts and the router specialise by domain:
    - a bias: `strength` is added to the router logits of the row's domain group, so group d's experts
      see (and specialise on) domain d's tokens from the start;
    - a routing loss: -log of the router's own (unbiased) probability mass on the group, which teaches
      the router weights the same preference, so it survives when the bias is gone.
    After both reach 0 the model trains as a plain MoE, and the saved model is a stock model with no
    trace of either. Without them, a model this small and this briefly trained spreads every domain
    over most experts (see docs/study.md).
    """

    def __init__(self, model, domains: list[str], num_experts: int):
        # round-robin groups: expert e belongs to domain e % len(domains). Upcycled experts cut from the
        # same parent (neighbouring indices) land in different groups, which pulls them apart.
        self.groups = {d: list(range(i, num_experts, len(domains))) for i, d in enumerate(domains)}
        self.table = torch.zeros(len(domains), num_experts)
        for i, d in enumerate(domains):
            self.table[i, self.groups[d]] = 1.0
        self.bias = None  # (rows * seq, E) while a biased batch runs
        self.mask = None  # (rows * seq, E) group membership of each token's domain
        self.logits = []  # the router's own (unbiased) logits of the current batch, per layer
        for layer in model.model.layers:
            router = layer.mlp.gate
            router.forward = self._wrap(router, router.forward)

    def _wrap(self, router, original):
        def forward(hidden_states):
            logits, scores, indices = original(hidden_states)
            if self.mask is not None:
                self.logits.append(logits)
            if self.bias is None:
                return logits, scores, indices
            logits = logits + self.bias.to(logits.dtype)
            probs = torch.softmax(logits.float(), dim=-1)
            top, indices = torch.topk(probs, router.top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), indices
        return forward

    def set(self, domain_rows: list[int], seq_len: int, strength: float, supervise: bool) -> None:
        rows = self.table[torch.as_tensor(domain_rows)].repeat_interleave(seq_len, dim=0)  # (B*T, E)
        self.bias = rows * strength if strength > 0 else None
        self.mask = rows if supervise else None
        self.logits = []

    def routing_loss(self) -> torch.Tensor:
        """Mean over layers and tokens of -log(router probability mass on the token's domain group)."""
        losses = [-(torch.softmax(z.float(), dim=-1) * self.mask).sum(-1).clamp_min(1e-9).log().mean()
                  for z in self.logits]
        return torch.stack(losses).mean()

    def clear(self) -> None:
        self.bias, self.mask, self.logits = None, None, []


def save_model(model, tok, path: Path):
    import copy
    from transformers import GenerationConfig
    m = copy.deepcopy(model).to("cpu", dtype=torch.bfloat16)
    m.config.output_router_logits = False  # inference default; set True to read router logits
    m.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=64)
    m.save_pretrained(path)
    tok.save_pretrained(path)
    if m.config.model_type == "qwen2_moe":
        add_zero_qkv_biases(path)


def add_zero_qkv_biases(path: Path) -> None:
    """Store zero q/k/v biases and set `qkv_bias: true` in a saved Qwen2-MoE folder.

    Training runs without these biases; transformers' outputs are bit-identical with zero biases, and
    vLLM's Qwen2-MoE always loads q/k/v biases (it generates garbage without them). Idempotent.
    """
    from safetensors.torch import load_file, save_file

    weights = Path(path) / "model.safetensors"
    tensors = load_file(weights)
    for key in [k for k in tensors if re.search(r"self_attn\.[qkv]_proj\.weight$", k)]:
        w = tensors[key]
        tensors.setdefault(key[: -len("weight")] + "bias", torch.zeros(w.shape[0], dtype=w.dtype))
    save_file(tensors, weights, metadata={"format": "pt"})
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["qkv_bias"] = True
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
