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
import time
from pathlib import Path

import numpy as np
import torch

from demo_training.data import DEFAULT_MIX, DOMAINS, DomainStream, read_texts, train_tokenizer
from demo_training.heldout import greedy_eval, load_eval_rows
from demo_training.model import DomainRouterBias, build_model, copy_matching, save_model, upcycle


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
