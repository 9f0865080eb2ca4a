"""The benchmark scripts of `bench/` on a tiny budget: they run, and what they check holds.

Their timings are never asserted (they mean something only on an idle machine, see bench/BENCHMARKS.md); what is
asserted is the identity `bench/evaluation.py` reports between `evaluate_episodes` (feature cache, batched episodes)
and the reference-style loop (features recomputed per episode, one episode at a time), in both loss resolutions, and
what `bench/gpu_suite.py --dry_run` reports: every part, finite numbers, the exact and autograd solvers agreeing, a
report (and a non-zero exit) when a part fails, parts skipped once the budget is spent, atomic report writes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_evaluation_benchmark_matches_the_reference_style_loop(tmp_path):
    report_path = tmp_path / "report.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "evaluation.py"),
        "--num_images",
        "2",
        "--num_episodes",
        "6",
        "--reference_episodes",
        "3",
        "--image_size",
        "64",
        "--backbone",
        "resnet18",
        "--hidden_size",
        "32",
        "--steps",
        "3",
        "--episode_batch_size",
        "4",
        "--output",
        str(report_path),
    ]
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
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "episode.py"),
        "--image-size",
        "65",
        "--base-classes",
        "3",
        "--steps",
        "4",
        "--naive",
    ]
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


# ---------------------------------------------------------------------------------------------------------------------
# bench/gpu_suite.py: no GPU runs it here, so its --dry_run (same code path, CPU, tiny sizes) keeps it from rotting
# ---------------------------------------------------------------------------------------------------------------------
def _run_gpu_suite(output_dir, *extra):
    # The repository's package, whichever gfss_hf the interpreter would otherwise find (e.g. another checkout's
    # editable install).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--output_dir", str(output_dir), "--dry_run", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _numbers(value):
    """Every int / float inside a JSON value (booleans excluded)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.fixture
def gpu_suite(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_suite

    return gpu_suite


@pytest.mark.slow
def test_gpu_suite_dry_run_reports_every_part_with_finite_numbers(tmp_path):
    done = _run_gpu_suite(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text(encoding="utf-8"))
    assert report["dry_run"] is True and report["ok"] is True
    assert set(report["parts"]) == {"forward", "pretrain", "protocol"}
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        numbers = _numbers(part["results"])
        assert numbers and all(math.isfinite(n) for n in numbers), name
    forward = report["parts"]["forward"]["results"]["measurements"]
    assert len(forward) == 8 and all(m["status"] == "ok" and m["images_per_s"] > 0 for m in forward)  # 2 batches x 4
    pretrain = report["parts"]["pretrain"]["results"]["measurements"]
    assert {(m["precision"], m["contrastive"]) for m in pretrain if m["status"] == "ok"} == {
        ("fp32", False),
        ("fp32", True),
        ("bf16", False),
        ("bf16", True),
    }
    assert all(m["pascal_100_epochs_h"] > 0 and m["coco_20_epochs_h"] > 0 for m in pretrain)
    protocol = report["parts"]["protocol"]["results"]
    ran = {
        (r["solver"], r["loss_resolution"], r["episode_batch_size"]) for r in protocol["runs"] if r["status"] == "ok"
    }
    assert {("exact", res, 4) for res in ("feature", "input")} | {
        ("autograd", res, 4) for res in ("feature", "input")
    } <= ran
    assert {("exact", "feature", 1), ("exact", "input", 1)} <= ran  # several episode batch sizes
    assert all(r["projected_fold_minutes"] > 0 for r in protocol["runs"])
    for resolution in ("feature", "input"):
        # Same predictions up to float rounding (an argmax near a tie may flip on another machine's BLAS).
        assert protocol["exact_vs_autograd"][resolution]["changed_pixels_fraction"] < 1e-3, resolution
    markdown = (tmp_path / "gpu_suite.md").read_text(encoding="utf-8")
    assert "DRY RUN" in markdown and "### Forward" in markdown and "### Paper protocol" in markdown
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".gpu_suite*"))


@pytest.mark.slow
def test_gpu_suite_failing_part_still_yields_a_report_and_a_nonzero_exit(tmp_path):
    done = _run_gpu_suite(tmp_path, "--parts", "forward", "pretrain", "--fail_parts", "pretrain")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text(encoding="utf-8"))
    assert report["ok"] is False
    assert report["parts"]["forward"]["status"] == "ok"
    failed = report["parts"]["pretrain"]
    assert failed["status"] == "failed" and "injected failure" in failed["error"] and failed["traceback"]
    assert "protocol" not in report["parts"]  # not requested
    assert "**pretrain**: failed" in (tmp_path / "gpu_suite.md").read_text(encoding="utf-8")


def test_gpu_suite_budget_skips_parts_and_a_crashing_part_is_recorded(gpu_suite, tmp_path, monkeypatch):
    args = gpu_suite.SuiteArguments(output_dir=str(tmp_path / "spent"), dry_run=True, budget_s=0.0)
    report = gpu_suite.run_suite(args, command="test", budget=gpu_suite.Budget(0.0))
    assert report["ok"] is True  # skipped is not failed
    assert {name: part["status"] for name, part in report["parts"].items()} == dict.fromkeys(
        gpu_suite.PARTS, "skipped"
    )
    assert json.loads((tmp_path / "spent" / "gpu_suite.json").read_text(encoding="utf-8"))["parts"] == report["parts"]

    def crash(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setitem(gpu_suite.PART_FUNCTIONS, "forward", crash)
    args = gpu_suite.SuiteArguments(output_dir=str(tmp_path / "crash"), dry_run=True, parts=["forward"])
    report = gpu_suite.run_suite(args, command="test", budget=gpu_suite.Budget(60.0))
    assert report["ok"] is False and report["parts"]["forward"]["error"] == "ValueError: boom"
    assert json.loads((tmp_path / "crash" / "gpu_suite.json").read_text(encoding="utf-8"))["ok"] is False


def test_gpu_suite_report_is_written_atomically(gpu_suite, tmp_path, monkeypatch):
    args = gpu_suite.SuiteArguments(output_dir=str(tmp_path), dry_run=True, budget_s=0.0)
    report = gpu_suite.run_suite(args, command="first", budget=gpu_suite.Budget(0.0))
    before = {name: (tmp_path / name).read_bytes() for name in ("gpu_suite.json", "gpu_suite.md")}

    def interrupted(src, dst):  # the process dies between writing the new report and renaming it into place
        raise OSError("interrupted")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(OSError, match="interrupted"):
        gpu_suite.write_report(tmp_path, {**report, "command": "second"})
    # The previous report is whole, and no half-written file is left behind.
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.md"]


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


def test_contrastive_gradients_benchmark_reports_both_norms(pretrained_tiny_dir, tmp_path):
    """On the tiny model and a tiny recipe: one row per batch with finite positive norms, ratio = their quotient and
    a cosine in [-1, 1]; a fresh model (--init) gives other numbers than the trained one."""
    import yaml
    from fixtures.make_tiny_model import TINY_SYNTHETIC_RUN

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**TINY_SYNTHETIC_RUN, "output_dir": str(tmp_path / "unused")}))
    rows = {}
    for flag in ([], ["--init"]):
        cmd = [sys.executable, str(ROOT / "bench" / "contrastive_gradients.py"), str(pretrained_tiny_dir)]
        cmd += ["--batches", "2", "--config", str(recipe), *flag]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        lines = [line for line in done.stdout.splitlines() if line[:1].isdigit()]
        assert len(lines) == 2
        rows[bool(flag)] = lines
        for line in lines:
            _, ce, ctr, ratio, cosine, loss = (float(v) for v in line.split("|"))
            assert ce > 0 and ctr > 0 and loss > 0
            assert ratio == pytest.approx(ctr / ce, rel=0.05, abs=0.05)
            assert -1.0 <= cosine <= 1.0
    assert rows[True] != rows[False]
