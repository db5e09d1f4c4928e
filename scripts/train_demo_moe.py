#!/usr/bin/env python
"""Train the shipped demo Mixture-of-Experts model from scratch.

Stock `transformers` Mixtral classes (MixtralConfig + MixtralForCausalLM), a small byte-level
BPE tokenizer whose pre-tokenizer splits digits individually, and domain-mixed training on
the corpus written by scripts/build_corpus.py.

    python scripts/build_corpus.py
    python scripts/train_demo_moe.py --minutes 45 --out runs/demo-moe

The same script trains the study model (moeprune/assets/study-moe): a Qwen3-MoE-shaped model with many
small experts, top-k routing and only the standard load-balancing loss (see its MODEL_CARD.md):

    python scripts/train_demo_moe.py --arch qwen3_moe --experts 32 --top-k 4 --inter 64 \
        --tokenizer-from moeprune/assets/demo-moe --minutes 50 --out runs/study-moe

The final model (weights saved in bfloat16) lands in <out>/final; intermediate checkpoints in
<out>/ckpt. The log (<out>/train.log) holds loss, learning rate, tokens/s, per-domain expert
usage and periodic greedy held-out accuracy; <out>/summary.json holds the final numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

DOMAINS = ["arith", "code", "prose", "json", "program"]
GENERATIVE = ["arith", "json", "program"]
# generative domains are upweighted so that they get learned
DEFAULT_MIX = {"arith": 0.32, "code": 0.14, "prose": 0.12, "json": 0.14, "program": 0.28}
SPECIALS = ["<s>", "</s>", "<pad>"]


# --------------------------------------------------------------------------- tokenizer


def read_texts(path: Path, limit: int | None = None) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["text"])
            if limit is not None and len(out) >= limit:
                break
    return out


def train_tokenizer(corpus: Path, vocab_size: int, out_dir: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # a space right after ':' is always its own token, so prompts that end in ': '
        # (e.g. "A: ", "# output: ") tokenize exactly as they do inside training text
        pre_tokenizers.Split(Regex(r": "), behavior="merged_with_previous"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)

    def it():
        for d in DOMAINS:
            lim = 30000 if d in GENERATIVE else None
            for t in read_texts(corpus / d / "train.jsonl", lim):
                yield t

    tok.train_from_iterator(it(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", model_max_length=512)
    hf.save_pretrained(out_dir)
    return hf


# --------------------------------------------------------------------------- data


class DomainStream:
    """All training documents of one domain as one token array, with document starts."""

    def __init__(self, tok, texts: list[str]):
        enc = tok(texts, add_special_tokens=False)["input_ids"]
        bos, eos = tok.bos_token_id, tok.eos_token_id
        lens = np.array([len(e) + 2 for e in enc], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        arr = np.empty(int(lens.sum()), dtype=np.int32)
        for s, e in zip(self.starts, enc):
            arr[s] = bos
            arr[s + 1:s + 1 + len(e)] = e
            arr[s + 1 + len(e)] = eos
        self.tokens = arr
        # only documents starting early enough to fill a window
        self.n_tokens = len(arr)

    def sample(self, rng: np.random.Generator, length: int) -> np.ndarray:
        last_ok = np.searchsorted(self.starts, self.n_tokens - length, side="right")
        i = int(rng.integers(0, max(1, last_ok)))
        s = int(self.starts[i])
        return self.tokens[s:s + length]


# --------------------------------------------------------------------------- evaluation


def _first_line(s: str) -> str:
    return s.split("\n", 1)[0]


def extract_number(s: str) -> str | None:
    line = _first_line(s)
    m = re.search(r"####\s*(-?\d+)", line)
    if m:
        return m.group(1)
    nums = re.findall(r"-?\d+", line)
    return nums[-1] if nums else None


def score(domain: str, generated: str, answer: str) -> bool:
    if domain == "arith":
        return extract_number(generated) == answer.strip()
    if domain == "json":
        return " ".join(_first_line(generated).split()) == " ".join(answer.split())
    return _first_line(generated).strip() == answer.strip()


@torch.no_grad()
def greedy_eval(model, tok, rows_by_domain: dict, device: str, batch_size: int = 50,
                max_new_tokens: dict | None = None) -> dict:
    """Greedy decoding on held-out prompts; returns exact-match accuracy per domain."""
    max_new_tokens = max_new_tokens or {"arith": 64, "json": 40, "program": 24}
    was_training, was_router = model.training, model.config.output_router_logits
    model.eval()
    model.config.output_router_logits = False  # aux loss in generate() breaks with padding
    tok.padding_side = "left"
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    stop = [tok.eos_token_id] + ([nl[0]] if len(nl) == 1 else [])
    res = {}
    for d, rows in rows_by_domain.items():
        correct = 0
        samples = []
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens[d], do_sample=False,
                                 eos_token_id=stop, pad_token_id=tok.pad_token_id)
            gen = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, g in zip(chunk, gen):
                ok = score(d, g, r["answer"])
                correct += ok
                if len(samples) < 3:
                    samples.append({"prompt": r["prompt"], "gen": _first_line(g), "answer": r["answer"]})
        res[d] = {"acc": correct / max(1, len(rows)), "n": len(rows), "samples": samples}
    model.train(was_training)
    model.config.output_router_logits = was_router
    return res


def load_eval_rows(assets: Path, n: int | None = None) -> dict:
    out = {}
    for d in GENERATIVE:
        rows = [json.loads(l) for l in open(assets / "eval" / f"{d}.jsonl", encoding="utf-8")]
        out[d] = rows[:n] if n else rows
    return out


# --------------------------------------------------------------------------- main


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--assets", default="moeprune/assets/demo-corpus")
    ap.add_argument("--out", default="runs/demo-moe")
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    ap.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=3072)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=224)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2, help="experts per token")
    ap.add_argument("--aux-coef", type=float, default=0.02)
    ap.add_argument("--arch", choices=["mixtral", "qwen2_moe", "qwen3_moe"], default="mixtral",
                    help="mixtral, qwen3_moe: routed experts only; qwen2_moe: routed experts plus one shared expert")
    ap.add_argument("--shared-inter", type=int, default=128, help="shared expert intermediate size (qwen2_moe)")
    ap.add_argument("--upcycle-from", default=None,
                    help="start from a trained model folder, splitting each of its experts into --split experts")
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("--domain-bias", type=float, default=0.0,
                    help="training-time router logit bonus for the experts of each row's domain group (0: off)")
    ap.add_argument("--domain-bias-until", type=float, default=0.6,
                    help="fraction of the budget at which the domain bias has decayed linearly to 0")
    ap.add_argument("--route-loss", type=float, default=0.0,
                    help="weight of a training-time loss teaching the router itself the domain groups (0: off)")
    ap.add_argument("--route-loss-until", type=float, default=0.7,
                    help="fraction of the budget at which the routing loss weight has decayed linearly to 0")
    ap.add_argument("--router-noise", type=float, default=0.05,
                    help="upcycling: noise added to copied router rows, relative to their std")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every-min", type=float, default=8.0)
    ap.add_argument("--eval-n", type=int, default=100)
    ap.add_argument("--final-eval-n", type=int, default=0, help="held-out rows of the final eval (0: all)")
    ap.add_argument("--experts-impl", default="grouped_mm", help="transformers experts_implementation")
    ap.add_argument("--init-dense-from", default=None,
                    help="start embeddings/attention/norms from this model folder (same shapes); experts and "
                         "routers start fresh")
    ap.add_argument("--tokenizer-from", default=None,
                    help="use the tokenizer saved in this folder instead of training one")
    ap.add_argument("--init-from", default=None,
                    help="continue from a saved model folder (its tokenizer and weights) instead of training anew")
    ap.add_argument("--mix", default=None, help="domain sampling weights, e.g. arith=0.3,json=0.25,program=0.3,...")
    ap.add_argument("--assumed-tok-s", type=float, default=0.0,
                    help="ignored (kept for old command lines); the cosine schedule follows wall-clock time")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "train.log", "a", encoding="utf-8")

    def log(msg: str):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    log(f"args: {vars(args)}")
    t0 = time.time()
    corpus, assets = Path(args.corpus), Path(args.assets)
    if args.init_from or args.upcycle_from or args.tokenizer_from:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer_from or args.init_from or args.upcycle_from)
    else:
        tok = train_tokenizer(corpus, args.vocab, out / "tokenizer")
    log(f"tokenizer: vocab {len(tok)} trained in {time.time() - t0:.1f}s; "
        f"'Q: 123+45=?' -> {tok.tokenize('Q: 123+45=?')}")

    streams = {}
    for d in DOMAINS:
        t1 = time.time()
        streams[d] = DomainStream(tok, read_texts(corpus / d / "train.jsonl"))
        log(f"domain {d}: {streams[d].n_tokens} train tokens, {len(streams[d].starts)} docs "
            f"({time.time() - t1:.1f}s)")

    if args.init_from:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32,
                                                     experts_implementation=args.experts_impl).to(args.device)
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = args.aux_coef
        args.experts = getattr(model.config, "num_local_experts", None) or model.config.num_experts
        args.layers = model.config.num_hidden_layers
        args.top_k = model.config.num_experts_per_tok
        log(f"continuing from {args.init_from}")
    elif args.upcycle_from:
        model = upcycle(args.upcycle_from, tok, args, log).to(args.device)
    else:
        model = build_model(tok, args)
        if args.init_dense_from:
            copy_matching(model, args.init_dense_from, log)
        model = model.to(args.device)
    affinity = None
    if args.domain_bias > 0 or args.route_loss > 0:
        affinity = DomainRouterBias(model, DOMAINS, args.experts)
        log(f"domain router bias {args.domain_bias} -> 0 at {args.domain_bias_until:.0%} of the budget; "
            f"routing loss {args.route_loss} -> 0 at {args.route_loss_until:.0%}; groups {affinity.groups}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M params; config {model.config.to_diff_dict()}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    eval_rows = load_eval_rows(assets, args.eval_n)
    args_mix = dict(DEFAULT_MIX)
    if args.mix:
        args_mix.update({k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))})
    mix_names = list(args_mix)
    mix_p = np.array([args_mix[d] for d in mix_names])
    mix_p = mix_p / mix_p.sum()

    budget_s = args.minutes * 60
    tokens_per_step = args.batch * args.seq_len
    total_steps = args.max_steps or 10 ** 9
    t_start = time.time()
    step, tokens_seen = 0, 0
    ema_loss, last_eval = None, time.time()
    usage = {d: np.zeros((args.layers, args.experts)) for d in DOMAINS}
    dom_loss = {d: [] for d in DOMAINS}
    history = []
    model.train()
    while True:
        elapsed = time.time() - t_start
        if elapsed > budget_s or step >= total_steps:
            break
        # cosine schedule over wall-clock progress (robust to CPU contention from other jobs);
        # with --max-steps it runs over steps instead
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            prog = step / total_steps if args.max_steps else elapsed / budget_s
            prog = min(1.0, prog)
            lr = args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))
        for g in opt.param_groups:
            g["lr"] = lr

        doms = rng.choice(len(mix_names), size=args.batch, p=mix_p)
        if affinity is not None:
            prog_b = step / total_steps if args.max_steps else (time.time() - t_start) / budget_s
            strength = args.domain_bias * max(0.0, 1.0 - prog_b / args.domain_bias_until)
            route_w = args.route_loss * max(0.0, 1.0 - prog_b / args.route_loss_until)
            affinity.set([DOMAINS.index(mix_names[i]) for i in doms], args.seq_len, strength, route_w > 0)
        rows = [streams[mix_names[i]].sample(rng, args.seq_len) for i in doms]
        x = np.full((args.batch, args.seq_len), tok.pad_token_id, dtype=np.int64)
        for j, r in enumerate(rows):
            x[j, :len(r)] = r
        ids = torch.from_numpy(x).to(args.device)
        labels = ids.clone()
        labels[labels == tok.pad_token_id] = -100
        outp = model(input_ids=ids, labels=labels, output_router_logits=True)
        loss = outp.loss
        route_l = None
        if affinity is not None and affinity.mask is not None:
            route_l = affinity.routing_loss()
            loss = loss + route_w * route_l
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += tokens_per_step
        aux = float(outp.aux_loss.detach())
        lm = outp.loss.item() - args.aux_coef * aux
        ema_loss = lm if ema_loss is None else 0.95 * ema_loss + 0.05 * lm

        if step % args.log_every == 0:
            with torch.no_grad():
                # per-domain expert usage (top-k of router softmax) and per-domain loss
                logits = outp.logits.float()
                tl = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                    reduction="none", ignore_index=-100).view(args.batch, -1).mean(1)
                for j, di in enumerate(doms):
                    dom_loss[mix_names[di]].append(tl[j].item())
                for li, rl in enumerate(outp.router_logits):
                    top = rl.float().softmax(-1).topk(args.top_k, dim=-1).indices.view(args.batch, -1, args.top_k)
                    for j, di in enumerate(doms):
                        usage[mix_names[di]][li] += np.bincount(top[j].reshape(-1).cpu().numpy(),
                                                                minlength=args.experts)
            el = time.time() - t_start
            dl = " ".join(f"{d}={np.mean(v[-20:]):.2f}" for d, v in dom_loss.items() if v)
            bias_note = (f" bias {strength:.2f} route {route_w:.3f}x{route_l.item() if route_l is not None else 0:.3f}"
                         if affinity is not None else "")
            log(f"step {step}/{total_steps if total_steps < 10**9 else '?'} loss {lm:.3f}{bias_note} "
                f"ema {ema_loss:.3f} aux {aux:.3f} lr {lr:.2e} "
                f"tok {tokens_seen} {tokens_seen / el:.0f} tok/s {el / 60:.1f}min | {dl}")
            history.append({"step": step, "tokens": tokens_seen, "loss": lm, "ema": ema_loss,
                            "minutes": el / 60})
        if step % (args.log_every * 8) == 0:
            for d in DOMAINS:
                u = usage[d][-1]
                if u.sum():
                    log(f"usage last-layer {d}: " + " ".join(f"{v / u.sum():.2f}" for v in u))
            usage = {d: np.zeros((args.layers, args.experts)) for d in DOMAINS}
        if affinity is not None:
            affinity.clear()
        if time.time() - last_eval > args.eval_every_min * 60:
            ev = greedy_eval(model, tok, eval_rows, args.device)
            log(f"eval@{step}: " + " ".join(f"{d}={v['acc']:.2f}" for d, v in ev.items())
                + " | " + json.dumps({d: v["samples"][0] for d, v in ev.items()}))
            save_model(model, tok, out / "ckpt")
            last_eval = time.time()

    wall = time.time() - t_start
    save_model(model, tok, out / "final")
    ev = greedy_eval(model, tok, load_eval_rows(assets, args.final_eval_n or None), args.device)
    summary = {"params": n_params, "steps": step, "tokens": tokens_seen, "wall_s": wall,
               "final_loss_ema": ema_loss, "final_loss": history[-1]["loss"] if history else None,
               "domain_loss": {d: float(np.mean(v[-20:])) for d, v in dom_loss.items() if v},
               "mix": args_mix, "args": vars(args),
               "heldout_greedy": {d: {"acc": v["acc"], "n": v["n"]} for d, v in ev.items()},
               "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"done: {step} steps, {tokens_seen} tokens, {wall / 60:.1f} min, ema loss {ema_loss:.3f}; "
        f"held-out greedy: " + " ".join(f"{d}={v['acc']:.3f}" for d, v in ev.items()))


if __name__ == "__main__":
    main()
