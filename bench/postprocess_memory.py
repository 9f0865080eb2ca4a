"""Peak memory of the pipeline's post-processing on huge queries: banded (default) against the former untiled path.

Post-processing turns the canvas logits `(C, S, S)` of one query into the outputs at the query's size: a label map,
one mask per present class and a score per class. The untiled path (`postprocess_band_rows=0`) resized every
class's logits to full resolution and took their softmax there: `2 x C x H x W` float32 (16.8 GB for 21 classes at
10000 x 10000). The banded path works on row bands of `POSTPROCESS_BAND_BYTES` and keeps a one-byte label map.

Each case runs in its own subprocess: the pipeline (the tiny test model, 21 class names as in a PASCAL-5i GFSS
episode: background, 15 base, 5 novel) and the logits are set up, the peak-RSS counter is reset
(`/proc/self/clear_refs`), `postprocess` runs, and the worker reports its resident memory before and its peak RSS
during post-processing (`VmHWM`, the same counter as `ru_maxrss`). Three classes win somewhere in the logits (a
query holds a few classes, and each present class costs a full-size output mask of 1 byte per pixel).

The address space of a worker is capped (`--cap_gb` above its size after setup, `RLIMIT_AS`), so that a path that
needs more fails with MemoryError instead of pushing a shared machine into swap or the OOM killer.

    python bench/postprocess_memory.py                      # 3000^2 and 10000^2, both paths, cap 6 GB
    python bench/postprocess_memory.py --sizes 3000 --cap_gb 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "gfss-tiny-synthetic-fold0"
NUM_CLASSES = 21


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(size: int, path: str, cap_gb: float) -> dict:
    import torch
    from transformers import pipeline

    import gfss_hf  # registers the task

    assert Path(gfss_hf.__file__).resolve().parents[1] == ROOT, gfss_hf.__file__

    torch.set_num_threads(1)
    pipe = pipeline("few-shot-segmentation", model=str(MODEL), device="cpu")
    pipe.postprocess_band_rows = 0 if path == "untiled" else None
    canvas = pipe.image_processor.image_size
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, NUM_CLASSES, canvas, canvas, generator=generator) * 0.1
    thirds = [slice(0, canvas // 3), slice(canvas // 3, 2 * canvas // 3), slice(2 * canvas // 3, canvas)]
    for cls, cols in zip((0, 3, NUM_CLASSES - 1), thirds):
        logits[0, cls, :, cols] += 5.0
    learned = {
        "mode": "gfss",
        "base_names": [f"base{i}" for i in range(NUM_CLASSES - 5)],
        "class_names": [f"novel{i}" for i in range(5)],
    }
    outputs = {"logits": logits, "original_size": (size, size)}
    limit = _status_kb("VmSize") * 1024 + int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    try:
        segments = pipe.postprocess(outputs, _learned=learned)
        error = None
    except (MemoryError, RuntimeError) as err:
        segments, error = [], f"{type(err).__name__}: {str(err)[:120]}"
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {
        "size": size,
        "path": path,
        "classes": NUM_CLASSES,
        "present": [s["label"] for s in segments],
        "rss_before_mb": round(before / 1024),
        "peak_rss_mb": round(peak / 1024),
        "added_mb": round((peak - before) / 1024),
        "seconds": round(seconds, 2),
        "error": error,
        "cap_gb": cap_gb,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000], help="query sides (square)")
    parser.add_argument("--paths", nargs="+", default=["banded", "untiled"], choices=("banded", "untiled"))
    parser.add_argument("--cap_gb", type=float, default=6.0, help="address space a worker may add after setup")
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print("RESULT=" + json.dumps(worker(int(args.worker[0]), args.worker[1], args.cap_gb)))
        return 0
    # The package of this checkout, whatever an editable install elsewhere points to.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    results = []
    for size in args.sizes:
        for path in args.paths:
            cmd = [sys.executable, __file__, "--worker", str(size), path, "--cap_gb", str(args.cap_gb)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
            if proc.returncode or not line:
                raise SystemExit(f"worker {size} {path} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            result = json.loads(line[-1][len("RESULT=") :])
            results.append(result)
            print(json.dumps(result), flush=True)
    print(
        json.dumps(
            {
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, {platform.platform()}",
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
