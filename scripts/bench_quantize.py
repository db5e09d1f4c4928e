"""GPTQ against round-to-nearest on a shipped model: held-out output error, and time / peak memory per layer.

    python scripts/bench_quantize.py errors demo --configs 4:32,4:64,4:128,4:channel,8:auto
    python scripts/bench_quantize.py timing demo

`errors`: the calibration set (default: the built-in one) is split by batch: the first --calib-batches
calibrate GPTQ, the last --heldout-batches (never seen by GPTQ) give each quantized tensor's inputs in the
unquantized model; error = ||W X - Wq X||^2 / ||W X||^2, averaged over the tensors of each decoder layer, then
GPTQ / RTN per layer and their mean. `timing`: per decoder layer, GPTQ seconds (Hessian pass, solves, and the
pass giving the next layer's inputs) as ratios to RTN of the same layer and to one bare forward of the layer
over the same calibration tokens, measured in one run (run it on a quiet machine), with the growth of resident
memory during each phase, the layer's Hessian bytes and the calibration hidden states' bytes. Prints JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's moeprune, not another install


def _calibration(model_name: str, max_length: int, batch_size: int):
    from moeprune.checkpoint.model_dir import load_tokenizer, resolve_model_dir
    from moeprune.observe.calibration import load_calibration

    return load_calibration(None, load_tokenizer(resolve_model_dir(model_name)), batch_size=batch_size,
                            max_length=max_length).batches


def _config(text: str):
    from moeprune.compress.quantize_plan import parse_group_size

    bits, group = text.split(":")
    return int(bits), parse_group_size(group)


def errors(args) -> dict:
    from moeprune.checkpoint.model_dir import load_model
    from moeprune.compress.gptq import GPTQOptions
    from moeprune.compress.gptq_eval import heldout_grams, layer_means, output_errors
    from moeprune.compress.quantize import quantize_model
    from moeprune.models import MoEAdapter

    torch.set_num_threads(args.threads)
    base = load_model(args.model).eval()
    batches = _calibration(args.model, args.max_length, args.batch_size)
    if len(batches) < args.calib_batches + args.heldout_batches:
        sys.exit(f"only {len(batches)} calibration batches")
    calib, heldout = batches[:args.calib_batches], batches[-args.heldout_batches:]
    grams = heldout_grams(base, heldout)
    prefix = MoEAdapter(base).spec.layers
    out = {"model": args.model, "calib_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
           "heldout_tokens": sum(int(b["attention_mask"].sum()) for b in heldout), "configs": {}}
    for text in args.configs.split(","):
        bits, group = _config(text)
        res = {}
        for method in ("rtn", "gptq"):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            q = quantize_model(model, bits=bits, group_size=group, method=method,
                               calibration=calib if method == "gptq" else None,
                               gptq=GPTQOptions(act_order=args.act_order, min_tokens=args.min_tokens,
                                                sequential=not args.no_sequential))
            res[method] = {"seconds": round(time.perf_counter() - start, 2), "group_size": q.group_size,
                           "errors": output_errors(base, model, grams), "kl": _kl(base, model, heldout)}
            if method == "gptq":
                res[method]["rtn_experts"] = {k: v["rtn_experts"] for k, v in q.method_details["layers"].items()}
            del model
        g = layer_means(res["gptq"]["errors"], prefix)
        r = layer_means(res["rtn"]["errors"], prefix)
        kinds = {}
        for name in res["rtn"]["errors"]:
            kind = name.rsplit(".", 1)[-1] if "experts." not in name else "experts." + name.rsplit(".", 1)[-1]
            kinds.setdefault(kind, []).append(res["gptq"]["errors"][name] / max(res["rtn"]["errors"][name], 1e-30))
        out["configs"][text] = {
            "group_size": res["gptq"]["group_size"],
            "layer_ratio": {i: round(g[i] / r[i], 4) for i in g},
            "mean_layer_ratio": round(sum(g[i] / r[i] for i in g) / len(g), 4),
            "rtn_layer_error": {i: round(v, 6) for i, v in r.items()},
            "gptq_layer_error": {i: round(v, 6) for i, v in g.items()},
            "ratio_by_kind": {k: round(sum(v) / len(v), 4) for k, v in sorted(kinds.items())},
            "seconds": {"rtn": res["rtn"]["seconds"], "gptq": res["gptq"]["seconds"]},
            "next_token_kl": {"rtn": res["rtn"]["kl"], "gptq": res["gptq"]["kl"]},
            "rtn_fallback_experts": res["gptq"]["rtn_experts"],
        }
        print(json.dumps({text: out["configs"][text]["mean_layer_ratio"]}), file=sys.stderr, flush=True)
    return out


def _kl(base, model, batches) -> float:
    """Mean KL(base || quantized) of the next-token distributions over the held-out tokens (end to end)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            p = torch.log_softmax(base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
            q = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(),
                                  -1)
            kl = (p.exp() * (p - q)).sum(-1)
            mask = b["attention_mask"].bool()
            total, count = total + float(kl[mask].sum()), count + int(mask.sum())
    return round(total / max(count, 1), 6)


class _PeakRSS:
    """Polls this process's resident memory; `peak()` since the last `reset()`."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval, self._peak, self._stop = psutil.Process(os.getpid()), interval, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            self._peak = max(self._peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> int:
        now = self.proc.memory_info().rss
        self._peak = now
        return now

    def peak(self) -> int:
        return max(self._peak, self.proc.memory_info().rss)

    def stop(self):
        self._stop = True


def timing(args) -> dict:
    """Per decoder layer: bare forward over the calibration tokens, RTN of the layer, GPTQ of the layer."""
    import gc

    from moeprune.checkpoint.model_dir import load_model
    from moeprune.compress import gptq as g
    from moeprune.compress.rtn import expert_views, fake_quantize
    from moeprune.compress.quantize_plan import check_quantize, quant_targets
    from moeprune.models import MoEAdapter
    from moeprune.models.adapter import _get_path

    torch.set_num_threads(args.threads)
    base = load_model(args.model).eval()
    batches = _calibration(args.model, args.max_length, args.batch_size)[:args.calib_batches]
    bits, group = _config(args.configs.split(",")[0])
    group = check_quantize(base, bits, group)
    adapter = MoEAdapter(base)
    spec = adapter.spec
    layers = _get_path(base, spec.layers)
    modules = dict(base.named_modules())
    targets = [n for n, _ in quant_targets(base, adapter).linears]
    moe = {layer.index: layer for layer in adapter.layers}
    options = g.GPTQOptions(act_order=args.act_order)
    solve = dict(bits=bits, group_size=group, damp=options.damp, act_order=options.act_order,
                 block_size=options.block_size)
    rss = _PeakRSS()
    rows = []
    with torch.no_grad():
        inputs = g._capture_inputs(base, layers, batches)
        for index, layer in enumerate(layers):
            prefix = f"{spec.layers}.{index}."
            linears = {n: modules[n] for n in targets if n.startswith(prefix)}
            original = {k: v.clone() for k, v in layer.state_dict().items()}
            row = {"layer": index}
            # bare forward
            gc.collect()
            before = rss.reset()
            start = time.perf_counter()
            for batch in inputs:
                g._run_layer(layer, index, batch)
            row["forward_s"], row["forward_peak_mb"] = time.perf_counter() - start, (rss.peak() - before) / 2**20
            # RTN of this layer
            gc.collect()
            before = rss.reset()
            start = time.perf_counter()
            tensors = [m.weight for m in linears.values()]
            if index in moe:
                tensors += expert_views(adapter, moe[index])
            for t in tensors:
                t.copy_(fake_quantize(t, bits=bits, group_size=group))
            row["rtn_s"], row["rtn_peak_mb"] = time.perf_counter() - start, (rss.peak() - before) / 2**20
            layer.load_state_dict(original)
            # GPTQ of this layer: Hessian pass, solves, and the pass giving the next layer's inputs
            gc.collect()
            before = rss.reset()
            start = time.perf_counter()
            hs = g.HessianSet(adapter, prefix, linears, moe.get(index)).accumulate(layer, index, inputs)
            for name, module in linears.items():
                module.weight.copy_(g.gptq_solve(module.weight, hs.acc[name].hessian(), **solve).weight)
            if index in moe:
                g._solve_experts(adapter, moe[index], hs, solve, options, bits, group)
            del hs
            for batch in inputs:
                batch["hidden"] = g._run_layer(layer, index, batch).detach()
            row["gptq_s"], row["gptq_peak_mb"] = time.perf_counter() - start, (rss.peak() - before) / 2**20
            row["gptq_over_rtn_time"] = row["gptq_s"] / max(row["rtn_s"], 1e-9)
            row["gptq_over_forward_time"] = row["gptq_s"] / max(row["forward_s"], 1e-9)
            # resident-memory growth: the allocator reuses freed memory, so a phase that fits in what an earlier
            # one freed shows ~0; ratios only where the denominator grew by at least 1 MiB
            row["gptq_over_rtn_peak"] = row["gptq_peak_mb"] / row["rtn_peak_mb"] if row["rtn_peak_mb"] >= 1 else None
            row["gptq_over_forward_peak"] = (row["gptq_peak_mb"] / row["forward_peak_mb"]
                                             if row["forward_peak_mb"] >= 1 else None)
            widths = [m.in_features for m in linears.values()]
            hess = sum(w * w for w in widths)
            if index in moe:
                hess += sum(v.shape[0] * v.shape[-1] ** 2 for v in expert_views(adapter, moe[index]))
            row["hessian_mb"] = hess * 4 / 2**20
            row["hidden_states_mb"] = sum(b["hidden"].numel() * b["hidden"].element_size() for b in inputs) / 2**20
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    rss.stop()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"model": args.model, "config": args.configs.split(",")[0], "tokens": tokens, "threads": args.threads,
            "layers": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["errors", "timing"])
    p.add_argument("model", help="model folder, or demo / study")
    p.add_argument("--configs", default="4:32,4:64,4:128,4:channel,8:auto", help="BITS:GROUP,... (timing: the first)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--calib-batches", type=int, default=32)
    p.add_argument("--heldout-batches", type=int, default=8)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--min-tokens", type=int, default=32)
    p.add_argument("--no-sequential", action="store_true",
                   help="calibrate every layer on the unquantized model's inputs (default: the quantized ones)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("-o", "--output", default=None, help="write the JSON here too")
    args = p.parse_args()
    result = errors(args) if args.mode == "errors" else timing(args)
    text = json.dumps(result, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
