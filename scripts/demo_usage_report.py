#!/usr/bin/env python
"""Expert-usage report for the demo MoE: which experts the router picks per domain.

Runs the model on held-out text of each domain with output_router_logits=True, takes the
top-k experts (k: the model's num_experts_per_tok) of the router softmax for every (non-special) token, and writes
  <out>/expert_usage.png   heatmap, domains x experts, one panel per layer
  <out>/expert_usage.json  counts, per-domain fractions, mutual information I(domain; expert)
                           per layer and averaged (bits), greedy held-out exact match for the
                           generative domains, perplexity for code/prose, trivial baselines

The mutual information uses a uniform prior over domains (each domain's selections are
normalised to a distribution first), so it ranges from 0 (routing ignores the domain) to
log2(#domains) bits; each token contributes its two selected experts.

    python scripts/demo_usage_report.py --model moeprune/assets/demo-moe --out moeprune/assets/demo-moe
"""
from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

DOMAINS = ["arith", "code", "prose", "json", "program"]
GENERATIVE = ["arith", "json", "program"]


def load_heldout_texts(corpus: Path, assets: Path, n: int) -> dict[str, list[str]]:
    out = {}
    for d in DOMAINS:
        p = corpus / d / "heldout.jsonl"
        if p.exists():
            rows = [json.loads(l)["text"] for l in open(p, encoding="utf-8")]
        else:  # shipped eval files only
            rows = []
            for l in open(assets / "eval" / f"{d}.jsonl", encoding="utf-8"):
                r = json.loads(l)
                rows.append(r["text"] if "text" in r else r["prompt"] + r["answer"])
        out[d] = rows[:n]
    return out


def num_experts(cfg) -> int:
    """Routed experts per layer, whatever the config calls them."""
    return getattr(cfg, "num_local_experts", None) or cfg.num_experts


def mutual_information(counts: np.ndarray) -> float:
    """I(D;E) in bits for counts[d, e], uniform prior over domains."""
    p_e_given_d = counts / counts.sum(1, keepdims=True).clip(min=1)
    p_d = np.full(counts.shape[0], 1.0 / counts.shape[0])
    joint = p_d[:, None] * p_e_given_d
    p_e = joint.sum(0)
    nz = joint > 0
    return float((joint[nz] * np.log2(joint[nz] / (p_d[:, None] * p_e[None, :])[nz])).sum())


@torch.no_grad()
def expert_counts(model, tok, texts: dict[str, list[str]], max_len: int = 256):
    L, E = model.config.num_hidden_layers, num_experts(model.config)
    k = model.config.num_experts_per_tok
    counts = {d: np.zeros((L, E), dtype=np.int64) for d in texts}
    nll = {d: [0.0, 0] for d in texts}
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    for d, rows in texts.items():
        for t in rows:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=max_len)["input_ids"]
            out = model(input_ids=ids, labels=ids, output_router_logits=True)
            keep = torch.tensor([i not in special for i in ids[0].tolist()])
            for li, rl in enumerate(out.router_logits):
                top = rl.float().softmax(-1).topk(k, dim=-1).indices[keep]
                counts[d][li] += np.bincount(top.reshape(-1).numpy(), minlength=E)
            n = ids.shape[1] - 1
            nll[d][0] += out.loss.item() * n  # loss = LM loss (+ aux); aux removed below
            nll[d][0] -= model.config.router_aux_loss_coef * float(out.aux_loss) * n
            nll[d][1] += n
    ppl = {d: math.exp(v[0] / max(1, v[1])) for d, v in nll.items()}
    return counts, ppl


def plot(counts: dict, mi: list[float], path: Path, title: str = "demo-moe", k: int = 2) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doms = list(counts)
    L, E = counts[doms[0]].shape
    fig, axes = plt.subplots(1, L, figsize=(3.2 * L, 2.9), sharey=True)
    axes = np.atleast_1d(axes)
    for li, ax in enumerate(axes):
        m = np.stack([counts[d][li] / counts[d][li].sum() for d in doms])
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=max(0.5, m.max()), aspect="auto")
        ax.set_title(f"layer {li}  MI={mi[li]:.2f} bits", fontsize=9)
        ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(doms)))
        ax.set_yticklabels(doms)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.85, label=f"share of top-{k} selections")
    fig.suptitle(f"{title}: router top-{k} expert usage per domain (held-out text)", fontsize=10, y=1.06)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def trivial_baselines(assets: Path) -> dict:
    out = {}
    for d in GENERATIVE:
        answers = [json.loads(l)["answer"] for l in open(assets / "eval" / f"{d}.jsonl", encoding="utf-8")]
        a, c = Counter(answers).most_common(1)[0]
        out[d] = {"most_common_answer": a, "acc": c / len(answers)}
    return out


def load_stage(path: Path) -> dict:
    """A training stage's numbers: its summary.json, or (for a run stopped before writing one)
    its train.log, counted up to the last checkpoint it saved (the eval@ lines)."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    import ast
    lines = path.read_text(encoding="utf-8").splitlines()
    a = ast.literal_eval(next(l for l in lines if "] args: " in l).split("] args: ", 1)[1])
    a.setdefault("aux_coef", 0.02)
    ckpt_step = max([int(re.search(r"eval@(\d+)", l).group(1)) for l in lines if "eval@" in l] or [0])
    st = [l for l in lines if re.search(r"\] step \d+/", l)]
    rows = []
    for l in st:
        m = re.search(r"step (\d+)/\S+ loss \S+ ema (\S+) .* ([\d.]+)min", l)
        rows.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    upto = [r for r in rows if r[0] <= ckpt_step] or rows[:1]
    mix = dict(DEFAULT_MIX)
    if a.get("mix"):
        mix.update({k: float(v) for k, v in (i.split("=") for i in a["mix"].split(","))})
    a["out"] = a["out"] + "/ckpt"
    return {"steps": ckpt_step, "tokens": ckpt_step * a["batch"] * a["seq_len"],
            "wall_s": upto[-1][2] * 60, "final_loss_ema": upto[-1][1], "args": a, "mix": mix,
            "note": f"stopped early; the next stage continued from its step-{ckpt_step} checkpoint"}


DEFAULT_MIX = {"arith": 0.32, "code": 0.14, "prose": 0.12, "json": 0.14, "program": 0.28}


def _upcycle_source(a: dict, summaries: list[dict], i: int, out: Path) -> str:
    """The folder a stage upcycled from. A stage that upcycled the shipped model of its day (the folder
    this card describes, since overwritten) is shown as the previous stage's output, which it equals."""
    src = a["upcycle_from"]
    if i > 0 and Path(src).resolve() == out.resolve():
        return summaries[i - 1]["args"]["out"].removesuffix("/ckpt") + "/final"
    return src


def usage_markdown(report: dict, k: int) -> list[str]:
    """The card's usage section: per layer, a domains x experts table of selection shares, and the MI."""
    n_layers, n_experts = len(report["mi_bits_per_layer"]), len(report["usage_fraction"][DOMAINS[0]][0])
    out = [f"Share of top-{k} router selections (router softmax, top-{k}) per domain and layer on held-out text "
           f"({', '.join(f'{d} {n}' for d, n in report['n_texts_per_domain'].items())} texts), "
           "special tokens excluded:\n"]
    for li in range(n_layers):
        out.append(f"Layer {li} (MI {report['mi_bits_per_layer'][li]:.3f} bits)\n")
        out.append("| domain | " + " | ".join(f"e{e}" for e in range(n_experts)) + " |\n|---|" + "---|" * n_experts)
        for d in DOMAINS:
            out.append(f"| {d} | " + " | ".join(f"{v:.2f}" for v in report["usage_fraction"][d][li]) + " |")
        out.append("")
    out.append(f"Mutual information between domain and selected expert (uniform prior over the 5 domains, "
               f"max possible {report['mi_bits_max_possible']:.2f} bits): per layer "
               + ", ".join(f"{v:.3f}" for v in report["mi_bits_per_layer"])
               + f"; mean {report['mi_bits_mean']:.3f} bits. Raw numbers: `expert_usage.json`.\n")
    return out


def zero_neurons(model) -> int:
    """How many routed-expert neurons are zero in every expert of every layer (padding, scripts/pad_demo_experts.py)."""
    zero = None
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):  # (E, 2I, H)
            inter = p.shape[1] // 2
            z = ~(p[:, :inter].any(-1).any(0) | p[:, inter:].any(-1).any(0))
        elif name.endswith("experts.down_proj"):  # (E, H, I)
            z = ~p.any(1).any(0)
        else:
            continue
        zero = z if zero is None else zero & z
    return 0 if zero is None else int(zero.sum())


PADDING_NOTE = (  # measured when the demo was padded (2026-12-01): scripts/pad_demo_experts.py, docs/serving.md
    "so each adds down * silu(0) * 0 = 0 and the network computes the same function (float32 logits of the "
    "padded and the 112-wide model differ by at most 1.5e-5 on 40 held-out texts, 4779 tokens, same argmax "
    "everywhere; the routers are untouched, so routing and the usage tables below are unchanged). Why: 128 is "
    "a multiple of 32, so `moeprune quantize --bits 4` picks group size 128 by default and the int4 output "
    "serves in vLLM's CPU build, whose int4 MoE kernel needs group sizes 64/128 and expert widths that are "
    "multiples of 32 (112 is divisible by none of 128/64/32; see docs/serving.md)")


def _architecture_lines(cfg, model, arch: str, size: int, aux_coef) -> list[str]:
    """The card's architecture bullets (parameter counts; expert padding explained when present)."""
    n_params = sum(p.numel() for p in model.parameters())
    E, k = num_experts(cfg), cfg.num_experts_per_tok
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    shared = getattr(cfg, "shared_expert_intermediate_size", None)
    pad = zero_neurons(model)
    pad_params = pad * 3 * cfg.hidden_size * E * cfg.num_hidden_layers
    trained = n_params - pad_params
    lines = [f"- `{arch}` (stock transformers classes), "
             + (f"{n_params / 1e6:.2f}M parameters stored ({trained / 1e6:.2f}M trained + {pad_params / 1e6:.2f}M "
                "always-zero expert padding, see below)" if pad else f"{n_params / 1e6:.2f}M parameters")
             + f", weights stored in bfloat16 (folder size {size / 2**20:.1f} MiB)"]
    width = f"{inter} ({inter - pad} trained neurons + {pad} always-zero ones, see below)" if pad else f"{inter}"
    lines.append(
        f"- {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} attention heads "
        f"({cfg.num_key_value_heads} KV heads), {E} routed experts per layer, top-{k} routing "
        f"({'renormalised ' if getattr(cfg, 'norm_topk_prob', True) else ''}softmax gates), routed expert "
        f"intermediate size {width}"
        + (f", plus one always-on shared expert (intermediate size {shared}, sigmoid-gated) per layer"
           if shared else "")
        + f", tied input/output embeddings, router aux loss coefficient {aux_coef}")
    if shared:
        routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
        share = f"{routed / 1e6:.2f}M of the {n_params / 1e6:.2f}M parameters ({routed / n_params:.0%})"
        if pad:
            share = (f"{routed / 1e6:.2f}M of the {n_params / 1e6:.2f}M stored parameters ({routed / n_params:.0%}; "
                     f"{(routed - pad_params) / 1e6:.2f}M of the {trained / 1e6:.2f}M trained ones, "
                     f"{(routed - pad_params) / trained:.0%})")
        lines.append(f"- routed experts hold {share}; pruning removes routed experts only, the shared expert "
                     "always stays")
    if pad:
        lines.append(f"- expert padding: the routed experts were trained {inter - pad} wide and are shipped {inter} "
                     f"wide (`scripts/pad_demo_experts.py`): each expert has {pad} extra neurons whose `gate_proj`/"
                     f"`up_proj` rows and `down_proj` columns are zero, " + PADDING_NOTE)
    return lines


def write_model_card(out: Path, model, report: dict, summaries: list[dict], manifest_path: Path) -> None:
    cfg = model.config
    steps = sum(s["steps"] for s in summaries)
    tokens = sum(s["tokens"] for s in summaries)
    wall = sum(s["wall_s"] for s in summaries) / 60
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"domains": {}}
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "MODEL_CARD.md")
    L = []
    w = L.append
    arch = (cfg.architectures or [type(model).__name__])[0]
    E, k = num_experts(cfg), cfg.num_experts_per_tok
    w(f"# demo-moe: a tiny {arch.removesuffix('ForCausalLM')}-architecture MoE trained on CPU\n")
    w("Shipped with moeprune as a self-contained demo model whose experts can be observed, pruned "
      f"and merged. It is a toy: a few million parameters, trained for {wall:.0f} minutes on 2 CPU "
      "cores. It is not useful as a language model beyond these five synthetic/stdlib domains.\n")
    w("## Architecture\n")
    for line in _architecture_lines(cfg, model, arch, size, summaries[-1]['args']['aux_coef']):
        w(line)
    w(f"- tokenizer: byte-level BPE, vocab {cfg.vocab_size}, trained with `tokenizers` on the training "
      "split; digits are always split into single tokens, and a space after ':' is its own token so "
      "prompts ending in ': ' tokenize like the training text. Special tokens `<s>` (bos, added to "
      "every encoded text), `</s>` (eos), `<pad>`.\n")
    w("## Training data (scripts/build_corpus.py, fixed seeds, fully offline)\n")
    w("| domain | content | source |\n|---|---|---|")
    desc = {"arith": "2-3 digit add/sub, multi-digit x 1-digit multiplication, short word problems; "
                     "column-wise steps on one line ending in `#### N`",
            "code": "Python standard-library source chunks (<= 1500 chars), test packages excluded",
            "prose": "English prose paragraphs (<= 1500 char chunks)",
            "json": "`Extract the fields from: <sentence>` -> one-line JSON (3 schemas, procedurally "
                    "generated names/cities/items)",
            "program": "tiny Python programs + `# output: <first printed line>` (outputs from executing them)"}
    for d in DOMAINS:
        src = manifest.get("domains", {}).get(d, {}).get("source", "")
        w(f"| {d} | {desc[d]} | {src} |")
    w("\nEach domain has train / heldout / calib splits that never overlap (generative domains: "
      "deduplicated by prompt; code/prose: split by source file). Shipped: "
      "`moeprune/assets/demo-corpus/eval/` (200 prompt/answer rows for arith/json/program, 100 texts "
      "for code/prose) and `moeprune/assets/demo-corpus/calib/` (128 texts per domain).\n")
    w("## Training (scripts/train_demo_moe.py)\n")
    w("AdamW (betas 0.9/0.95, weight decay 0.05), linear warmup + cosine decay, batch 16 x 256 tokens "
      "of packed documents, each row drawn from one domain with the generative domains upweighted, "
      "fp32 on CPU with `torch.set_num_threads(2)`, seeds fixed.\n")
    w("| stage | init | peak lr | domain mix | steps | tokens | wall time | final LM loss (EMA) |\n"
      "|---|---|---|---|---|---|---|---|")
    for i, s in enumerate(summaries):
        a = s["args"]
        mix = ", ".join(f"{k} {v:g}" for k, v in s.get("mix", {}).items())
        init = a.get("init_from") or "scratch"
        if a.get("upcycle_from"):
            init = (f"{_upcycle_source(a, summaries, i, out)}, upcycled to {a.get('arch', 'mixtral')} (each expert split into "
                    f"{a.get('split', 2)})")
        w(f"| {i + 1} | {init} | {a['lr']:g} | {mix} | {s['steps']} | "
          f"{s['tokens'] / 1e6:.2f}M | {s['wall_s'] / 60:.1f} min | {s['final_loss_ema']:.3f} |")
    for i, s in enumerate(summaries):
        a = s["args"]
        if a.get("domain_bias") or a.get("route_loss"):
            w(f"\nStage {i + 1} used a training-time domain affinity (experts split into {len(DOMAINS)} "
              "round-robin groups, one per domain (expert e in group e mod 5), training rows labelled with their domain): the router "
              f"logits of the row's domain group got +{a.get('domain_bias', 0):g}, decaying linearly to 0 at "
              f"{a.get('domain_bias_until', 0):.0%} of the stage's budget, and a routing loss "
              "(-log of the router's probability mass on the group, mean over tokens and layers) weighted "
              f"{a.get('route_loss', 0):g}, decaying to 0 at {a.get('route_loss_until', 0):.0%}; the rest of "
              "the stage trained a plain MoE. This is how the experts come to specialise by domain (the "
              "idea of domain-expert MoEs such as DEMix or Branch-Train-MiX); the saved model is a stock "
              "model with no bias, and its router alone decides at inference. The usage tables below are "
              "measured on that model.")
    for i, s in enumerate(summaries):
        note = s.get("note")
        if not note and s["wall_s"] < 0.9 * 60 * s["args"]["minutes"]:
            note = (f"stopped after {s['wall_s'] / 60:.1f} of its {s['args']['minutes']:g} budgeted minutes "
                    "(the script then sized a step-based cosine schedule from the throughput of the first "
                    "20 steps; it now follows wall-clock time)")
        if note:
            w(f"\nStage {i + 1}: {note}.")
    w(f"\nTotal: {steps} steps, {tokens / 1e6:.2f}M tokens, {wall:.1f} min of training wall time "
      "(2 shared CPU cores; other jobs ran on the same cores, so throughput varied).")
    dl = summaries[-1].get("domain_loss", {})
    if dl:
        w("Per-domain training loss at the end (mean of the last logged batches, nats/token): "
          + ", ".join(f"{d} {v:.2f}" for d, v in dl.items()) + ".\n")
    w("## Held-out scores\n")
    w("Measured with moeprune's own evaluation stage: see the \"Evaluation\" table at the end of this card\n"
      "(greedy exact match on 200 held-out prompts per generative domain, with trivial baselines).")
    w("\nPer-token perplexity on held-out text (first 256 tokens of each text): "
      + ", ".join(f"{d} {v:.2f}" for d, v in report["heldout_perplexity"].items()) + ".\n")
    w("## Expert usage per domain\n")
    w("![expert usage](expert_usage.png)\n")
    L.extend(usage_markdown(report, k))
    w("## Rebuild\n")
    w("```\npython scripts/build_corpus.py")
    for i, s in enumerate(summaries):
        a = s["args"]
        cmd = (f"python scripts/train_demo_moe.py --minutes {a['minutes']:g} --lr {a['lr']:g} "
               f"--warmup {a['warmup']} --out {a['out'].removesuffix('/ckpt')}")
        if a.get("init_from"):
            cmd += f" --init-from {a['init_from']}"
        if a.get("upcycle_from"):
            cmd += (f" --upcycle-from {_upcycle_source(a, summaries, i, out)} --arch {a['arch']} --split {a['split']}"
                    f" --shared-inter {a['shared_inter']}")
        if a.get("aux_coef", 0.02) != 0.02:
            cmd += f" --aux-coef {a['aux_coef']:g}"
        if a.get("domain_bias"):
            cmd += f" --domain-bias {a['domain_bias']:g} --domain-bias-until {a['domain_bias_until']:g}"
        if a.get("route_loss"):
            cmd += f" --route-loss {a['route_loss']:g} --route-loss-until {a['route_loss_until']:g}"
        if a.get("mix"):
            cmd += f" --mix {a['mix']}"
        w(cmd)
    w(f"cp -r {summaries[-1]['args']['out']}/final/* moeprune/assets/demo-moe/")
    w("python scripts/pad_demo_experts.py moeprune/assets/demo-moe /tmp/demo-moe-128 --width 128 && "
      "cp /tmp/demo-moe-128/{model.safetensors,config.json} moeprune/assets/demo-moe/")
    if any(s.get("note") for s in summaries):
        w("# (stages marked 'stopped early' above were interrupted after their last checkpoint)")
    w("python scripts/demo_usage_report.py --model moeprune/assets/demo-moe --train-summary "
      + " ".join(s["_path"] for s in summaries))
    w("```\nTraining stops on a wall-clock budget, so the exact step count (and therefore the weights) "
      "depends on the machine's speed; the data and initialisation are seeded.\n")
    card = out / "MODEL_CARD.md"
    old = card.read_text(encoding="utf-8") if card.exists() else ""
    start, end = old.find("<!-- eval:start -->"), old.find("<!-- eval:end -->")
    if 0 <= start < end:  # keep the evaluation section written by scripts/demo_eval_scores.py
        L.append(old[start:end + len("<!-- eval:end -->")] + "\n")
    card.write_text("\n".join(L), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moeprune/assets/demo-moe")
    ap.add_argument("--out", default=None, help="output folder (default: the model folder)")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--assets", default="moeprune/assets/demo-corpus")
    ap.add_argument("--n-texts", type=int, default=100, help="held-out texts per domain")
    ap.add_argument("--no-generate", action="store_true", help="skip the greedy-decoding check")
    ap.add_argument("--train-summary", nargs="*", default=[],
                    help="summary.json files of the training stages, in order; with these a "
                         "MODEL_CARD.md is written into the output folder")
    ap.add_argument("--usage-markdown", default=None,
                    help="also write the card's expert-usage section (markdown) to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out or args.model)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = load_heldout_texts(Path(args.corpus), Path(args.assets), args.n_texts)
    counts, ppl = expert_counts(model, tok, texts)
    L = model.config.num_hidden_layers
    mi = [mutual_information(np.stack([counts[d][li] for d in DOMAINS])) for li in range(L)]
    report = {
        "model": str(args.model),
        "n_texts_per_domain": {d: len(v) for d, v in texts.items()},
        "mi_bits_per_layer": mi, "mi_bits_mean": float(np.mean(mi)),
        "mi_bits_max_possible": math.log2(len(DOMAINS)),
        "usage_fraction": {d: [(c / c.sum()).round(4).tolist() for c in counts[d]] for d in DOMAINS},
        "counts": {d: counts[d].tolist() for d in DOMAINS},
        "heldout_perplexity": {d: round(ppl[d], 3) for d in DOMAINS},
        "trivial_baselines": trivial_baselines(Path(args.assets)),
    }
    if not args.no_generate:
        from demo_training.heldout import greedy_eval, load_eval_rows

        ev = greedy_eval(model, tok, load_eval_rows(Path(args.assets)), "cpu")
        report["heldout_greedy_exact_match"] = {d: {"acc": v["acc"], "n": v["n"], "samples": v["samples"]}
                                                for d, v in ev.items()}
    k = model.config.num_experts_per_tok
    plot(counts, mi, out / "expert_usage.png", Path(args.model).name, k)
    (out / "expert_usage.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("mi_bits_per_layer", "mi_bits_mean", "heldout_perplexity")}, indent=2))
    if "heldout_greedy_exact_match" in report:
        print({d: v["acc"] for d, v in report["heldout_greedy_exact_match"].items()})
    if args.usage_markdown:
        Path(args.usage_markdown).write_text("\n".join(usage_markdown(report, k)))
    if args.train_summary:
        summaries = [dict(load_stage(Path(p)), _path=p) for p in args.train_summary]
        write_model_card(out, model, report, summaries, Path(args.corpus) / "manifest.json")


if __name__ == "__main__":
    main()
