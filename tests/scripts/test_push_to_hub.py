"""scripts/push_to_hub.py: the staged export passes its offline checks (--dry_run), broken exports are refused, and
the real push calls the Hub API exactly as intended (mocked)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

import gfss_hf.hub

REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "someone/gfss-synthetic-fold0"
RESULTS = {
    "config": {"dataset": "synthetic", "fold": 0, "protocol": "paper", "shots": 1, "seed": 42},
    "protocol": "paper",
    "metrics": {"fss_novel_miou": 0.4321, "gfss_novel_miou": 0.3, "gfss_base_miou": 0.75},
    "num_episodes": 50,
}


def _load_script():
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO_ROOT / "scripts" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def push():
    return _load_script()


@pytest.fixture(scope="module")
def output_dir(pretrained_tiny_dir, tmp_path_factory):
    """A training output folder: the tiny pre-trained model + training_config.yaml + an evaluation's results.json
    + files that must not be uploaded."""
    out = tmp_path_factory.mktemp("train_out") / "model"
    shutil.copytree(pretrained_tiny_dir, out)
    (out / "training_config.yaml").write_text(
        yaml.safe_dump(
            {"dataset": "synthetic", "fold": 0, "num_epochs": 4, "contrastive_weight": 0.0, "output_dir": str(out)}
        )
    )
    (out / "train_log.jsonl").write_text("{}\n")
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-1" / "optimizer.bin").write_bytes(b"0" * 16)
    (out / "eval").mkdir()
    (out / "eval" / "results.json").write_text(json.dumps(RESULTS))
    return out


@pytest.fixture(scope="module")
def staged(push, output_dir, tmp_path_factory):
    """`--dry_run --staging_dir`: the checks pass and the staged folder is kept; the Hub is never contacted."""
    staging = tmp_path_factory.mktemp("staging") / "export"
    # The script publishes through gfss_hf.hub (the path pretrain(push_to_hub=True) takes too): mock the Hub there.
    with mock.patch.object(gfss_hf.hub, "HfApi", side_effect=AssertionError("a dry run must not touch the Hub")):
        rc = push.main(
            [
                "--model_dir",
                str(output_dir),
                "--repo_id",
                REPO_ID,
                "--results",
                str(output_dir / "eval" / "results.json"),
                "--dry_run",
                "--staging_dir",
                str(staging),
            ]
        )
    assert rc == 0
    return staging


def _pipeline_shipped() -> bool:
    return importlib.util.find_spec("gfss_hf.pipeline_few_shot_segmentation") is not None


def test_dry_run_stages_a_clean_checked_export(push, staged, output_dir):
    files = sorted(p.name for p in staged.iterdir())
    for name in (
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "results.json",
        "training_config.yaml",
        "configuration_gfss.py",
        "modeling_gfss.py",
        "losses.py",
        "image_processing_gfss.py",
    ):
        assert name in files
    # Training by-products stay home.
    assert not {"train_log.jsonl", "checkpoints", "eval"} & set(files)
    config = json.loads((staged / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_gfss.GFSSModel"
    if _pipeline_shipped():
        assert "pipeline_few_shot_segmentation.py" in files
        assert config["custom_pipelines"]["few-shot-segmentation"]["impl"].endswith("FewShotSegmentationPipeline")

    card = ModelCard.load(staged / "README.md")
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics == {"fss_novel_miou": 43.21, "gfss_novel_miou": 30.0, "gfss_base_miou": 75.0}
    assert f'model="{REPO_ID}"' in card.text and "| contrastive_weight | 0.0 |" in card.text

    # Running the checks again on the kept folder passes, including the fresh-process load without gfss_hf.
    report = push.check_export(staged, output_dir / "eval" / "results.json")
    assert "transformers_modules" in report["remote"]["model_module"]
    if _pipeline_shipped():
        remote = report["remote"]
        assert "transformers_modules" in remote["pipeline_module"]
        assert list(remote["id2label"].values())[-1] == "probe" and remote["label_map_agreement"] >= 0.999


def test_checks_refuse_broken_exports(push, staged, output_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(staged, broken)
    (broken / "losses.py").unlink()
    with pytest.raises(push.ExportCheckError, match="losses.py"):
        push.check_files(broken)

    shutil.copyfile(staged / "losses.py", broken / "losses.py")
    (broken / "optimizer.bin").write_bytes(b"0")
    with pytest.raises(push.ExportCheckError, match="optimizer.bin"):
        push.check_files(broken)
    (broken / "optimizer.bin").unlink()
    (broken / "checkpoints").mkdir()
    with pytest.raises(push.ExportCheckError, match="checkpoints/"):
        push.check_files(broken)
    (broken / "checkpoints").rmdir()

    other = dict(RESULTS, metrics={"fss_novel_miou": 0.5})
    with pytest.raises(push.ExportCheckError, match="does not match"):
        push.check_card(broken, other)
    push.check_card(broken, RESULTS)

    config = json.loads((broken / "config.json").read_text())
    del config["auto_map"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(push.ExportCheckError, match="trust_remote_code"):
        push.check_files(broken)


@pytest.mark.slow
def test_remote_check_fails_when_the_export_needs_the_package(push, staged, tmp_path):
    needy = tmp_path / "needy"
    shutil.copytree(staged, needy)
    code = (needy / "modeling_gfss.py").read_text()
    (needy / "modeling_gfss.py").write_text("import gfss_hf  # leaked absolute import\n" + code)
    with pytest.raises(push.ExportCheckError, match="without gfss_hf failed"):
        push.check_remote_code(needy)


def test_push_uploads_the_staged_folder_and_nothing_else(push, output_dir, monkeypatch):
    # The checks are exercised by the dry-run test; here only the Hub calls matter.
    monkeypatch.setattr(gfss_hf.hub, "check_export", lambda folder, results=None, steps=2: {"folder": str(folder)})
    uploaded = {}

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded["files"] = sorted(p.name for p in folder.iterdir())
        uploaded["card"] = (folder / "README.md").read_text()
        return mock.Mock(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/1")

    api = mock.MagicMock(name="HfApi()")
    api.upload_folder.side_effect = upload_folder
    hf_api = mock.MagicMock(name="HfApi", return_value=api)
    monkeypatch.setattr(gfss_hf.hub, "HfApi", hf_api)
    rc = push.main(
        [
            "--model_dir",
            str(output_dir),
            "--repo_id",
            REPO_ID,
            "--token",
            "hf_dummy",
            "--private",
            "--results",
            str(output_dir / "eval" / "results.json"),
        ]
    )
    assert rc == 0
    hf_api.assert_called_once_with(token="hf_dummy")
    api.create_repo.assert_called_once_with(repo_id=REPO_ID, repo_type="model", private=True, exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == REPO_ID and kwargs["repo_type"] == "model" and kwargs["revision"] is None
    assert Path(kwargs["folder_path"]).name == "export"  # the staged folder, not the training output
    assert [c[0] for c in api.method_calls] == ["create_repo", "upload_folder"]  # nothing else touched
    assert "model.safetensors" in uploaded["files"] and "train_log.jsonl" not in uploaded["files"]
    assert "fss_novel_miou" in uploaded["card"]
    assert not Path(kwargs["folder_path"]).exists()  # the temporary staging folder is cleaned up


@pytest.mark.slow
def test_card_code_runs_without_the_package(staged, tmp_path):
    """The 'How to use' snippets of the card run as written (repo id -> the staged folder) where gfss_hf is absent."""
    if not _pipeline_shipped():
        pytest.fail("gfss_hf.pipeline_few_shot_segmentation is missing: the card's pipeline snippet cannot run.")
    text = (staged / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    image[20:50, 30:60] = (250, 30, 30)
    mask = np.zeros((70, 90), dtype=np.uint8)
    mask[20:50, 30:60] = 255
    Image.fromarray(image).save(tmp_path / "query.jpg")
    Image.fromarray(image).save(tmp_path / "support.jpg")
    Image.fromarray(mask).save(tmp_path / "support_mask.png")
    script = "import sys\nsys.modules['gfss_hf'] = None\n" + "\n".join(blocks).replace(REPO_ID, str(staged))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "my new class" in proc.stdout
