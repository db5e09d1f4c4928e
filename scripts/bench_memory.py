"""Peak memory of the out-of-core paths as a fraction of checkpoint size: the streaming prune and `moeprune run`.

Case `rewrite`: each path runs in a child process whose address space is capped with RLIMIT_AS at
max(--fraction x checkpoint bytes, --min-cap-gb): the floor covers the interpreter with torch and
transformers imported (~1.05 GB of address space before any weight is touched), so on checkpoints of
4 x min-cap and more the cap is exactly fraction x size. The streaming rewrite (`prune_checkpoint`) must
succeed under it; the whole-model in-memory path (load + `prune_experts` + `save_compressed`) is run
under the same cap to show it fails. Peak RSS is the child's VmHWM.

Case `run` (the end-to-end check of issue 11): `python -m moeprune run` of a recipe with `max_memory: 1GB`
(REAP 50%, calibration `demo:8` at 128 tokens, eval `demo_prose` and `demo_json` with `limit: 4`, dtype
auto) on the same random bf16 Mixtral-shaped checkpoint with the demo tokenizer copied in, as a child
process, uncapped. It reports the child's peak RSS (ru_maxrss) / checkpoint bytes (target < 0.35), output
safetensors bytes / input bytes (target < 0.62, bf16 kept) and report.json's "execution" (must be
"layerwise", picked by itself).

    python scripts/bench_memory.py --size-gb 5      # full size, both cases (peak RSS needs no idle CPU)
    python scripts/bench_memory.py --case run --model-dir /tmp/rand-4gb
    python scripts/bench_memory.py --quick          # 0.2 GB: the import floor dominates, the cap is the floor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["run_capped", "run_recipe_child", "main"]

RUN_TARGETS = {"rss_fraction": 0.35, "bytes_fraction": 0.62}

_CHILD = r"""
import json, resource, sys
cap, mode, src, out, keep = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
plan = {int(k): v for k, v in json.loads(keep).items()}
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
def hwm():
    return status("VmHWM")
try:
    if mode == "stream":
        from moeprune.checkpoint.rewrite import prune_checkpoint
        prune_checkpoint(src, out, plan)
    else:
        from moeprune.compress import prune_experts
        from moeprune.checkpoint.writer import save_compressed
        from moeprune.checkpoint.model_dir import load_model
        model = load_model(src, dtype="auto", device="cpu")
        prune_experts(model, plan)
        save_compressed(model, out, source_dir=src)
    print(json.dumps({"ok": True, "peak_rss": hwm(), "peak_vm": status("VmPeak")}))
except BaseException as exc:
    print(json.dumps({"ok": False, "peak_rss": hwm(), "error": f"{type(exc).__name__}: {str(exc)[:200]}"}))
"""


def run_capped(mode: str, src: Path, out: Path, keep: dict, cap: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(cap), mode, str(src), str(out), json.dumps(keep)],
                          capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", "MALLOC_ARENA_MAX": "2"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:  # killed before it could report (e.g. the allocator aborted)
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "peak_rss": None, "error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def run_sampled(cmd: list[str], *, env: dict, cwd: Path, log: Path, every: float = 0.05) -> dict:
    """Run `cmd`; its exit code, exact peak RSS (the child's own ru_maxrss, from wait4) and the largest
    RssAnon / RssFile seen by polling /proc (anonymous memory vs mapped file pages)."""

    peaks = {"RssAnon": 0, "RssFile": 0}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        while True:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]) * 1024)
            except (OSError, ValueError, IndexError):
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(every)
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    return {"rc": proc.returncode, "peak_rss": usage.ru_maxrss * 1024, "peak_rss_anon": peaks["RssAnon"],
            "peak_rss_file": peaks["RssFile"], "tail": tail}


def _child_env() -> dict:
    root = Path(__file__).resolve().parent.parent
    return {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


_OBSERVE = r"""
import sys, torch
from moeprune.execution.layers import observe_layerwise
g = torch.Generator().manual_seed(0)
vocab = int(sys.argv[2])
batches = [{"input_ids": torch.randint(0, vocab, (1, 128), generator=g)} for _ in range(8)]
observe_layerwise(sys.argv[1], batches, device="cpu", dtype=sys.argv[3], progress=False)
"""


def observe_child(src: Path, work: Path, *, dtype: str = "bfloat16") -> dict:
    """Layer-wise observation (8 x 128 random tokens) of `src` in a child: peak RSS, RssAnon, RssFile."""
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    r = run_sampled([sys.executable, "-c", _OBSERVE, str(src), str(vocab), dtype], env=_child_env(),
                    cwd=Path(__file__).resolve().parent.parent, log=work / "observe.log")
    size = _weights_bytes(src)
    out = {"ok": r["rc"] == 0, "dtype": dtype, "checkpoint_bytes": size, **{k: r[k] for k in r if k.startswith("peak")},
           "rss_fraction": round(r["peak_rss"] / size, 4), "error": None if r["rc"] == 0 else " | ".join(r["tail"])}
    gb = lambda n: f"{n / 1e9:.3f} GB"  # noqa: E731
    print(f"layer-wise observe ({dtype}): {'ok' if out['ok'] else 'FAILED'}; peak RSS {gb(out['peak_rss'])} = "
          f"{out['rss_fraction']} x checkpoint (RssAnon <= {gb(out['peak_rss_anon'])}, "
          f"RssFile <= {gb(out['peak_rss_file'])})")
    return out


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _with_tokenizer(src: Path, work: Path) -> Path:
    """`src` if it has a tokenizer; else a folder of links to its files plus the demo tokenizer (src untouched)."""
    from moeprune.checkpoint.model_dir import DEMO_MODEL_DIR, TOKENIZER_FILES

    if any((src / name).is_file() for name in TOKENIZER_FILES):
        return src
    view = work / "src-with-tokenizer"
    view.mkdir()
    for f in src.iterdir():
        (view / f.name).symlink_to(f.resolve())
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL_DIR / name).is_file():
            (view / name).write_bytes((DEMO_MODEL_DIR / name).read_bytes())
    return view


def run_recipe_child(src: Path, work: Path, *, max_memory: str = "1GB", rss_target: bool = True,
                     tasks: tuple[str, ...] = ("demo_prose", "demo_json")) -> dict:
    """`python -m moeprune run` of the issue-11 recipe on `src`, in a child; its peak RSS, sizes and execution."""
    import yaml

    model = _with_tokenizer(src, work)
    recipe = {"model": str(model), "method": "reap", "ratio": 0.5, "max_memory": max_memory,
              "calibration": {"spec": "demo:8", "max_length": 128, "batch_size": 8},
              "eval": {"tasks": list(tasks), "limit": 4}}
    path, out = work / "recipe.yaml", work / "run-out"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "moeprune", "run", str(path), "-o", str(out), "--no-progress"]
    # a fresh observation cache: the calibration pass is part of what is measured, never reused from a past run
    env = {**_child_env(), "MOEPRUNE_CACHE": str(work / "cache")}
    start = time.perf_counter()
    child = run_sampled(cmd, env=env, cwd=Path(__file__).resolve().parent.parent, log=work / "run.log")
    seconds = round(time.perf_counter() - start, 1)
    size = _weights_bytes(src)
    result = {"ok": child["rc"] == 0, "max_memory": max_memory, "tasks": list(tasks), "checkpoint_bytes": size, "peak_rss": child["peak_rss"],
              "rss_fraction": None if not child["peak_rss"] else round(child["peak_rss"] / size, 4),
              "output_bytes": None, "bytes_fraction": None, "execution": None, "output_dtype": None,
              "peak_rss_anon": child["peak_rss_anon"], "peak_rss_file": child["peak_rss_file"],
              "error": None if child["rc"] == 0 else " | ".join(child["tail"]), "seconds": seconds}
    if result["ok"]:
        report = json.loads((out / "report.json").read_text())
        result.update(execution=report.get("execution"), execution_reason=report.get("execution_reason"),
                      output_bytes=_weights_bytes(out), output_dtype=json.loads((out / "config.json").read_text()).get(
                          "dtype"), eval=report.get("eval"))
        result["bytes_fraction"] = round(result["output_bytes"] / size, 4)
    # on a small checkpoint the interpreter's ~0.5 GB dominates the RSS: only execution and bytes are judged
    result["pass"] = bool(result["ok"] and result["execution"] == "layerwise"
                          and (not rss_target or result["rss_fraction"] < RUN_TARGETS["rss_fraction"])
                          and result["bytes_fraction"] < RUN_TARGETS["bytes_fraction"])
    return result


def _print_run(r: dict) -> None:
    gb = lambda n: "-" if n is None else f"{n / 1e9:.3f} GB"  # noqa: E731
    print(f"moeprune run, max_memory {r['max_memory']}: {'ok' if r['ok'] else 'FAILED'}; execution {r['execution']}"
          f"; {'PASS' if r['pass'] else 'FAIL'}")
    print(f"  peak RSS {gb(r['peak_rss'])} = {r['rss_fraction']} x checkpoint (target < {RUN_TARGETS['rss_fraction']}; "
          f"RssAnon <= {gb(r['peak_rss_anon'])}, RssFile <= {gb(r['peak_rss_file'])})")
    print(f"  output {gb(r['output_bytes'])} = {r['bytes_fraction']} x input (target < {RUN_TARGETS['bytes_fraction']}),"
          f" dtype {r['output_dtype']}")
    print(f"  wall time {r['seconds']} s (the whole run, start-up included)")
    if r["error"]:
        print(f"  {r['error']}")


def _rewrite_case(src: Path, work: Path, args) -> dict:
    """The streaming prune and the in-memory prune under RLIMIT_AS = max(fraction x size, min cap)."""
    from bench_rewrite import half_plan

    size = _weights_bytes(src)
    cap = max(int(args.fraction * size), int(args.min_cap_gb * 1e9))
    keep = half_plan(src)
    stream = run_capped("stream", src, work / "stream", keep, cap)
    memory = run_capped("memory", src, work / "memory", keep, cap)
    free = run_capped("memory", src, work / "memory-free", keep, 1 << 62) if args.uncapped_in_memory else None
    frac = stream["peak_rss"] / size if stream["peak_rss"] else None
    out = {"checkpoint_bytes": size, "cap_bytes": cap, "cap_fraction": round(cap / size, 3),
           "stream_ok": stream["ok"], "stream_peak_rss": stream["peak_rss"], "stream_peak_vm": stream.get("peak_vm"),
           "stream_rss_fraction": None if frac is None else round(frac, 4), "target": args.fraction,
           "pass": bool(stream["ok"] and frac is not None and frac <= args.fraction),
           "in_memory_ok": memory["ok"], "in_memory_peak_rss": memory["peak_rss"],
           "in_memory_error": memory.get("error"), "stream_error": stream.get("error"),
           "uncapped_in_memory_peak_rss": None if free is None else free["peak_rss"]}
    gb = lambda n: "-" if n is None else f"{n / 1e9:.3f} GB"  # noqa: E731
    print(f"{'checkpoint':<22}{gb(size)}\n{'cap (RLIMIT_AS)':<22}{gb(cap)} ({out['cap_fraction']:.3f} x checkpoint)")
    print(f"{'path':<22}{'result':<10}{'peak RSS':>12}{'x checkpoint':>14}")
    runs = [("streaming prune", stream), ("in-memory prune", memory)] + ([("in-memory, no cap", free)] if free else [])
    for name, r in runs:
        share = "-" if r["peak_rss"] is None else f"{r['peak_rss'] / size:.3f}"
        print(f"{name:<22}{'ok' if r['ok'] else 'FAILED':<10}{gb(r['peak_rss']):>12}{share:>14}")
        if not r["ok"]:
            print(f"  {r['error']}")
    return out

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=None, help="Existing checkpoint (default: generate one).")
    ap.add_argument("--size-gb", type=float, default=5.0)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--min-cap-gb", type=float, default=1.2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--uncapped-in-memory", action="store_true",
                    help="Also run the in-memory path without a cap to report its peak RSS (needs ~2x the checkpoint).")
    ap.add_argument("--quick", action="store_true", help="A 0.2 GB checkpoint.")
    ap.add_argument("--case", choices=["all", "rewrite", "observe", "run"], default="all",
                    help="rewrite: streaming prune under a cap; observe: layer-wise observation; run: `moeprune run` "
                         "with max_memory 1GB.")
    ap.add_argument("--tasks", default="demo_prose,demo_json", help="The run case's eval tasks.")
    ap.add_argument("--max-memory", default=None,
                    help="The run case's recipe max_memory (default 1GB; 400MB with --quick: layer-wise is still picked).")
    args = ap.parse_args(argv)
    from make_random_checkpoint import source_checkpoint

    out: dict = {"quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as tmp:
        work = Path(tmp)
        src = source_checkpoint(args.model_dir, work, quick=args.quick, size_gb=args.size_gb)
        if args.case in ("all", "rewrite"):
            out["rewrite"] = _rewrite_case(src, work, args)
        if args.case in ("all", "observe"):
            out["observe"] = observe_child(src, work)
        if args.case in ("all", "run"):
            budget = args.max_memory or ("400MB" if args.quick else "1GB")
            out["run"] = run_recipe_child(src, work, max_memory=budget, rss_target=not args.quick,
                                         tasks=tuple(args.tasks.split(",")))
            _print_run(out["run"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
