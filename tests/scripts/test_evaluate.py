"""scripts/evaluate.py end to end: results files, episode replay, and 1 vs 2 processes (a real 2-process gloo group
on CPU via `accelerate launch --multi_gpu --num_processes 2`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gfss_hf
from gfss_hf.data.episodes import load_episodes
from gfss_hf.evaluation import episodes_hash, metric_keys

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evaluate.py"
COMMON = ["--num_val_images", "60", "--num_train_images", "60", "--runs", "2", "--num_episodes", "8",
          "--episode_batch_size", "4", "--no_progress"]  # fmt: skip
RUN_PROTOCOL_ARGS = ["--min_pixels", "100"]  # small procedural images: see tests/test_evaluation.py


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process(argv):
    """Run the script in this process with one intra-op thread, as each launched process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_script().main(argv)
    finally:
        torch.set_num_threads(threads)


def test_results_files_yaml_config_and_replay(pretrained_tiny_dir, tmp_path):
    config = tmp_path / "method.yaml"
    config.write_text("steps: 6\ngamma: 5.0\nloss_resolution: feature\n")
    out = tmp_path / "run1"
    episodes_file = tmp_path / "episodes.json"
    argv = [str(pretrained_tiny_dir), "--config", str(config), "--output_dir", str(out),
            "--save_episodes", str(episodes_file), *COMMON]  # fmt: skip
    single_process(argv)
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == set(metric_keys("paper"))
    assert results["gfss_hf_version"] == gfss_hf.__version__
    assert results["config"]["options"]["adaptation"]["steps"] == 6  # from the YAML file
    assert results["config"]["options"]["adaptation"]["gamma"] == 5.0
    assert results["config"]["options"]["adaptation"]["loss_resolution"] == "feature"
    assert results["num_episodes"] == 8
    episodes = load_episodes(episodes_file)
    assert results["episodes_hash"] == episodes_hash(episodes)
    table = (out / "results.md").read_text()
    assert "| 2-way novel | (B+2)-way novel | base |" in table
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporary file

    # A flag overrides the YAML value.
    assert load_script().parse_args([*argv, "--steps", "3"]).steps == 3

    # Replaying the saved episodes gives the same sums.
    replay = tmp_path / "run2"
    single_process([*argv[:5], "--episodes", str(episodes_file), "--output_dir", str(replay), *COMMON])
    again = json.loads((replay / "results.json").read_text())
    assert again["episodes_hash"] == results["episodes_hash"]
    assert again["accumulators"] == results["accumulators"]
    assert again["config"]["episodes_file"] == str(episodes_file)


WORKER = textwrap.dedent(
    """
    import importlib.util, json, sys
    import torch
    from accelerate import Accelerator

    spec = importlib.util.spec_from_file_location("evaluate_script", sys.argv[1])
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    for argv in json.loads(sys.argv[2]):
        script.evaluation_function(script.parse_args(argv), accelerator)
    if accelerator.is_main_process:
        with open(sys.argv[3], "w") as report:
            json.dump({"world": accelerator.num_processes}, report)
    accelerator.end_training()
    """
)


@pytest.mark.slow
def test_one_and_two_processes_agree(pretrained_tiny_dir, tmp_path):
    runs = []
    for protocol in ("paper", "diam", "capl"):
        extra = RUN_PROTOCOL_ARGS if protocol != "paper" else []
        base = [str(pretrained_tiny_dir), "--protocol", protocol, "--steps", "6", *COMMON, *extra]
        episodes_file = tmp_path / f"{protocol}.json"
        single_process([*base, "--output_dir", str(tmp_path / f"{protocol}-1"), "--save_episodes", str(episodes_file)])
        runs.append([*base, "--output_dir", str(tmp_path / f"{protocol}-2"), "--episodes", str(episodes_file)])
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(worker), str(SCRIPT),
              json.dumps(runs), str(report)]  # fmt: skip
    proc = subprocess.run(launch, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(report.read_text())["world"] == 2
    for protocol in ("paper", "diam", "capl"):
        one = json.loads((tmp_path / f"{protocol}-1" / "results.json").read_text())
        two = json.loads((tmp_path / f"{protocol}-2" / "results.json").read_text())
        assert two["timing"]["num_processes"] == 2 and one["timing"]["num_processes"] == 1
        assert two["episodes_hash"] == one["episodes_hash"]
        assert two["accumulators"] == one["accumulators"], protocol
        assert two["metrics"] == one["metrics"], protocol


def test_paper_numbers_equal_an_independent_replay_through_the_pipeline(pretrained_tiny_dir, tmp_path):
    """The episodes evaluate.py saved, replayed one by one through pipeline("few-shot-segmentation") and scored from
    the protocol's text (bench/replay_paper_protocol.py), give the numbers evaluate.py wrote: novel AND base."""
    out, episodes_file = tmp_path / "run", tmp_path / "episodes.json"
    single_process([str(pretrained_tiny_dir), "--output_dir", str(out), "--save_episodes", str(episodes_file),
                    "--steps", "6", "--num_val_images", "60", "--num_episodes", "16", "--no_progress"])  # fmt: skip
    spec = importlib.util.spec_from_file_location("replay", ROOT / "bench" / "replay_paper_protocol.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    report = replay.replay(str(pretrained_tiny_dir), str(episodes_file), str(out / "results.json"), progress=False)
    assert report["num_episodes"] == 16
    for key, value in report["replayed"].items():
        assert 0.0 < value < 1.0, key  # something was predicted and scored, not a degenerate agreement
        # Procedural images at the model's canvas size: the pipeline's original-size maps are the protocol's maps.
        assert value == pytest.approx(report["reported"][key], abs=1e-9), key
