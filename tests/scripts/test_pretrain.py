"""scripts/pretrain.py for real: `accelerate launch` with two CPU processes, SIGKILL + resume, CLI errors."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.make_tiny_model import TINY_SYNTHETIC_RUN
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain.py"
TINY = TINY_SYNTHETIC_RUN


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(*args, timeout=300):
    # --multi_gpu on a machine without GPUs forms a real 2-process gloo group (--cpu would run ONE process).
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        *map(str, args),
    ]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_two_processes_contrastive_gradient_equals_the_single_process_gradient(tmp_path):
    report = tmp_path / "report.json"
    _launch_two_processes(REPO / "tests" / "scripts" / "ddp_contrastive_check.py", report)
    result = json.loads(report.read_text())
    assert result["world_size"] == 2
    # Each process sampled only its own images, the contrast set held everyone's.
    assert 0 < result["local_samples"] < result["reference_samples"]
    assert result["ddp_loss_mean"] == pytest.approx(result["reference_loss"], rel=1e-5)
    assert result["params_compared"] > 10 and result["max_grad_abs"] > 1e-3
    assert result["max_grad_diff"] <= 1e-5 * max(1.0, result["max_grad_abs"])


@pytest.mark.slow
def test_two_process_pretraining_run(tmp_path, tiny_yaml):
    out = tmp_path / "ddp"
    _launch_two_processes(
        SCRIPT, "--config", tiny_yaml, "--output_dir", out, "--checkpointing_steps", "2", "--set", "max_steps=3"
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert results["world_size"] == 2 and results["global_step"] == 3
    assert (out / "checkpoints" / "checkpoint-2" / "process_state_1.safetensors").is_file()  # one per process
    from transformers import AutoModel

    import gfss_hf  # noqa: F401

    assert AutoModel.from_pretrained(out).config.num_labels == 16


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_yaml):
    flags = ["--config", str(tiny_yaml), "--checkpointing_steps", "2", "--set", "max_steps=20"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output_dir", str(killed), *flags],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 240
        while find_checkpoint(killed) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    stopped_at = int(find_checkpoint(killed).name.split("-")[1])
    assert 2 <= stopped_at < 20

    script = load_script()
    # The killed run used the subprocess's thread count; float reductions depend on it, so the in-process runs use
    # the same one (with OMP_NUM_THREADS unset, pytest would run them on every core).
    threads = torch.get_num_threads()
    torch.set_num_threads(int(_env()["OMP_NUM_THREADS"]))
    try:
        assert script.main(["--output_dir", str(killed), "--resume_from_checkpoint", "latest", *flags]) == 0
        reference = tmp_path / "reference"
        assert script.main(["--output_dir", str(reference), *flags]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = load_file(killed / "model.safetensors"), load_file(reference / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def find_checkpoint(output_dir):
    from gfss_hf.checkpointing import find_last_checkpoint

    return find_last_checkpoint(output_dir)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "learning_rat=0.1"], "unknown key(s) ['learning_rat']"),
        (["--fold", "9"], "fold=9 is not a fold of 'synthetic'"),
        (["--set", "dataset=pascal5i", "--data_dir", "{tmp}"], "JPEGImages"),
        (["--resume_from_checkpoint", "latest"], "no checkpoint in"),
        (["--push_to_hub"], "hub_model_id"),
        (["--set", "learning_rate=abc"], "learning_rate='abc' is invalid: expected a finite number, got str"),
        (["--set", "seed=abc"], "seed='abc' is invalid: expected an integer, got str; e.g. --set seed=0"),
        (["--set", "temperature=.nan"], "temperature=nan is invalid: expected a finite number"),
        (["--set", "contrastive_weight=.inf"], "contrastive_weight=inf is invalid: expected a finite number"),
        (["--set", "sed=1"], "unknown key(s) ['sed'] in the overrides (--set) (did you mean 'sed' -> 'seed'?)"),
        (["--set", "max_steps=[1"], "override 'max_steps=[1': the value '[1' of 'max_steps' is not valid YAML"),
        (["--config", "{tmp}/list.yaml"], "list.yaml' must hold a mapping of `key: value` lines, got list"),
        (["--config", "{tmp}/words.yaml"], "words.yaml' must hold a mapping of `key: value` lines, got str"),
    ],
)
def test_cli_rejects_bad_inputs_before_training(tmp_path, tiny_yaml, capsys, extra, message):
    out = tmp_path / "out"
    (tmp_path / "list.yaml").write_text("- seed\n- learning_rate\n")
    (tmp_path / "words.yaml").write_text("seed learning_rate\n")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    code = load_script().main(["--config", str(tiny_yaml), "--output_dir", str(out), *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_diverging_run_ends_with_the_step_not_done(tmp_path, tiny_yaml, capsys):
    out = tmp_path / "out"
    code = load_script().main(
        [
            "--config",
            str(tiny_yaml),
            "--output_dir",
            str(out),
            "--set",
            "max_steps=12",
            "--set",
            "learning_rate=1e12",
            "--set",
            "contrastive_weight=0",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "loss became non-finite at step" in captured.err and "done" not in captured.out
    assert not (out / "model.safetensors").exists()


def test_cli_rebuild_data_reaches_the_builders(tmp_path, tiny_yaml, monkeypatch):
    script = load_script()
    seen = {}
    monkeypatch.setattr(script, "pretrain", lambda config, **kwargs: seen.update(kwargs) or {})
    assert script.main(["--config", str(tiny_yaml), "--output_dir", str(tmp_path / "o"), "--rebuild_data"]) == 0
    assert seen["rebuild_data"] is True
