"""Peak RSS of the streaming prune as a fraction of checkpoint size (target <= 0.25), under a memory cap.

Each path runs in a child process whose address space is capped with RLIMIT_AS at
max(--fraction x checkpoint bytes, --min-cap-gb): the floor covers the interpreter with torch and
transformers imported (~1.05 GB of address space before any weight is touched), so on checkpoints of
4 x min-cap and more the cap is exactly fraction x size. The streaming rewrite (`prune_checkpoint`) must
succeed under it; the whole-model in-memory path (load + `prune_experts` + `save_compressed`) is run
under the same cap to show it fails. Peak RSS is the child's VmHWM.

    python scripts/bench_memory.py --size-gb 5      # full size (run on an otherwise idle CPU)
    python scripts/bench_memory.py --quick          # 0.2 GB: the import floor dominates, the cap is the floor
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["run_capped", "main"]

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
        from moeprune.stream import prune_checkpoint
        prune_checkpoint(src, out, plan)
    else:
        from moeprune.compress import prune_experts, save_compressed
        from moeprune.io import load_model
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
    args = ap.parse_args(argv)
    from bench_rewrite import half_plan
    from make_random_checkpoint import source_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir=args.workdir) as tmp:
        work = Path(tmp)
        src = source_checkpoint(args.model_dir, work, quick=args.quick, size_gb=args.size_gb)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
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
           "in_memory_error": memory.get("error"), "stream_error": stream.get("error"), "quick": args.quick,
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
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
