"""The benchmark scripts of `bench/` on a tiny budget: they run, and what they check holds.

Their timings are never asserted (they mean something only on an idle machine, see bench/BENCHMARKS.md); what is
asserted is the identity `bench/evaluation.py` reports between `evaluate_episodes` (feature cache, batched episodes)
and the reference-style loop (features recomputed per episode, one episode at a time), in both loss resolutions.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_evaluation_benchmark_matches_the_reference_style_loop(tmp_path):
    report_path = tmp_path / "report.json"
    cmd = [
        sys.executable, str(ROOT / "bench" / "evaluation.py"), "--num_images", "2", "--num_episodes", "6",
        "--reference_episodes", "3", "--image_size", "64", "--backbone", "resnet18", "--hidden_size", "32",
        "--steps", "3", "--episode_batch_size", "4", "--output", str(report_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["num_episodes"] == 6
    assert "--raw_batchnorm" not in report["command"]  # store_true flags appear only when set
    assert set(report["modes"]) == {"feature", "input"}
    for mode, entry in report["modes"].items():
        assert entry["identical_predictions"] is True, mode
        assert entry["reference_episodes"] == 3
        assert entry["episode_batch_size"] == 4
        assert entry["ours_episodes_per_second"] > 0 and entry["reference_episodes_per_second"] > 0
        metrics = entry["metrics"]
        assert {"fss_novel_miou", "gfss_novel_miou", "gfss_base_miou"} <= set(metrics)
        assert 0.0 < metrics["fss_fb_iou"] <= 1.0  # pixels were scored: the identity is not between empty sums
    assert not list(tmp_path.glob("*.tmp"))  # written to a temporary file and renamed


@pytest.mark.slow
def test_episode_benchmark_runs_and_reports_both_loss_resolutions():
    cmd = [sys.executable, str(ROOT / "bench" / "episode.py"), "--image-size", "65", "--base-classes", "3",
           "--steps", "4", "--naive"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for resolution in ("input", "feature"):
        (line,) = [x for x in lines if x.startswith(f"{resolution}-resolution loss:")]
        before, last = (float(w.rstrip(",")) for w in line.split() if w[0].isdigit())
        # Finite; not necessarily lower: on 9x9 random-weight features of norm ~30, lr 0.1 can overshoot.
        assert math.isfinite(before) and math.isfinite(last) and before > 0, line
    timed = [x for x in lines if x.startswith("adaptation (")]
    assert len(timed) == 3 and any("naive autograd" in x for x in timed), done.stdout
    assert "BatchNorm statistics measured" in done.stdout


@pytest.mark.slow
def test_postprocess_memory_benchmark_runs_both_paths():
    cmd = [sys.executable, str(ROOT / "bench" / "postprocess_memory.py"), "--sizes", "300", "--cap_gb", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert {r["path"] for r in report["results"]} == {"banded", "untiled"}
    for result in report["results"]:
        assert result["error"] is None and result["peak_rss_mb"] >= result["rss_before_mb"] > 0
        assert result["present"] == ["base0", "base3", "novel4"]  # both paths find the same classes
    assert {"command", "date", "machine"} <= set(report)
