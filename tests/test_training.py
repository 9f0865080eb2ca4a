"""The pre-training loop: config loading, input errors before training, a short run, exact resume, outputs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gfss_hf.training import (
    TrainingConfig,
    build_model,
    build_pretraining_datasets,
    cosine_schedule,
    find_last_checkpoint,
    pretrain,
    resolve_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    dataset="synthetic", fold=0, num_train_images=24, num_val_images=8, backbone="test_resnet", hidden_size=16,
    image_size=64, projection_dim=8, batch_size=4, max_samples=64, max_views=3, num_workers=0, learning_rate=0.05,
    logging_steps=1, report_to="none", eval_every_epochs=1, num_epochs=1,
)


def tiny_config(tmp_path, name="run", **overrides):
    return TrainingConfig.from_dict({**TINY, "output_dir": str(tmp_path / name), **overrides})


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; the Accelerate singletons must not leak between runs."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


# -- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["synthetic", "pascal5i", "coco20i"])
def test_shipped_configs_load(name):
    config = TrainingConfig.from_yaml(REPO / "scripts" / "configs" / f"{name}.yaml")
    assert config.dataset == name
    if name != "synthetic":  # the paper's recipe
        assert (config.backbone, config.image_size, config.batch_size) == ("resnet50s", 473, 12)
        assert config.learning_rate == pytest.approx(2.5e-3) and config.contrastive_weight == pytest.approx(0.1)
        assert config.num_epochs == (100 if name == "pascal5i" else 20)


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "synthetic", "learning_rat": 0.1, "epochs": 3}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epochs', 'learning_rat'\].*valid keys are: .*learning_rate"):
        TrainingConfig.from_yaml(path)
    with pytest.raises(ValueError, match="unknown key"):
        TrainingConfig.from_yaml(REPO / "scripts" / "configs" / "synthetic.yaml", overrides=["nope=1"])


def test_overrides_are_parsed_as_yaml_and_bad_values_rejected():
    config = TrainingConfig.from_yaml(
        REPO / "scripts" / "configs" / "synthetic.yaml",
        overrides=["max_steps=7", "base_temperature=0.07", "backbone_kwargs={channels: [8, 8, 8, 8]}", "hflip=false"],
    )
    assert config.max_steps == 7 and config.base_temperature == 0.07 and config.hflip is False
    assert config.backbone_kwargs == {"channels": [8, 8, 8, 8]}
    with pytest.raises(ValueError, match="key=value"):
        TrainingConfig.from_yaml(REPO / "scripts" / "configs" / "synthetic.yaml", overrides=["max_steps"])
    with pytest.raises(ValueError, match="contrastive_weight"):
        TrainingConfig(contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="dataset"):
        TrainingConfig(dataset="imagenet")


def test_cosine_schedule():
    f = cosine_schedule(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    assert cosine_schedule(10, "constant")(7) == 1.0


# -- errors before any training ----------------------------------------------------------------------------------
def _no_training_happened(config):
    out = Path(config.output_dir)
    return not (out / "model.safetensors").exists() and not (out / "train_log.jsonl").exists()


def test_fold_out_of_range(tmp_path):
    config = tiny_config(tmp_path, fold=4)
    with pytest.raises(ValueError, match=r"fold=4 is not a fold of 'synthetic'.*\[0, 1, 2, 3\]"):
        pretrain(config)
    assert _no_training_happened(config)


@pytest.mark.parametrize("dataset,match", [
    ("pascal5i", "JPEGImages"),
    ("coco20i", "instances_train2014.json"),
    ("folder", "images/"),
])
def test_data_dir_without_the_expected_layout(tmp_path, dataset, match):
    data = tmp_path / "data"
    (data / "something_else").mkdir(parents=True)
    config = tiny_config(tmp_path, dataset=dataset, data_dir=str(data))
    with pytest.raises(FileNotFoundError, match=match):
        pretrain(config)
    with pytest.raises(ValueError, match="needs data_dir"):
        pretrain(tiny_config(tmp_path, dataset=dataset))
    assert _no_training_happened(config)


def test_resume_folder_without_checkpoint(tmp_path):
    config = tiny_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        pretrain(config, resume_from_checkpoint="latest")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        pretrain(config, resume_from_checkpoint=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="hub_model_id"):
        pretrain(config, push_to_hub=True)
    assert _no_training_happened(config)


# -- data and model ------------------------------------------------------------------------------------------
def test_datasets_use_the_base_training_label_space(tmp_path):
    config = tiny_config(tmp_path)
    train, val = build_pretraining_datasets(config)
    sample = train[0]
    assert sample["pixel_values"].shape == (3, 64, 64) and sample["labels"].dtype == torch.int64
    values = set(torch.cat([train[i]["labels"].flatten() for i in range(len(train))]).tolist())
    values |= set(torch.cat([val[i]["labels"].flatten() for i in range(len(val))]).tolist())
    assert values <= set(range(16)) | {255}  # background + 15 base classes of fold 0, novel -> 255
    assert max(values - {255}) > 0
    # Flips are a function of (seed, epoch, index): repeatable, and they change with the epoch.
    flips = []
    for epoch in range(6):
        train.set_epoch(epoch)
        a, b = train[1], train[1]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        flips.append(a["pixel_values"])
    assert any(not torch.equal(flips[0], f) for f in flips[1:])
    assert len(val) == 8


def test_build_model_is_seeded_and_leaves_the_global_rng_alone(tmp_path):
    config = tiny_config(tmp_path)
    state = torch.random.get_rng_state()
    a, b = build_model(config), build_model(config)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.num_labels == 16 and a.projection is not None
    assert build_model(config.replace(contrastive_weight=0.0)).projection is None


# -- runs ------------------------------------------------------------------------------------------------------
class _FakeHfApi:
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kwargs):
        _FakeHfApi.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        _FakeHfApi.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/user/tiny/commit/abc"


def test_short_run_lowers_the_loss_saves_a_loadable_model_and_pushes(tmp_path, monkeypatch):
    import gfss_hf.training as training

    monkeypatch.setattr(training, "HfApi", _FakeHfApi)
    _FakeHfApi.calls = []
    config = tiny_config(tmp_path, max_steps=16, num_train_images=40)
    summary = pretrain(config, push_to_hub=True, hub_model_id="user/tiny", hub_token="tok")
    losses = [r["loss"] for r in summary["history"]]
    assert len(losses) == 16 and all(r["contrastive"] > 0 for r in summary["history"])
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 * 0.9
    assert summary["history"][-1]["lr"] == pytest.approx(0.0)
    assert summary["eval"] and 0.0 <= summary["final_eval"]["base_miou"] <= 1.0

    from transformers import AutoImageProcessor, AutoModel

    import gfss_hf  # noqa: F401  (registers the Auto classes)

    out = Path(config.output_dir)
    model = AutoModel.from_pretrained(out)
    assert type(model).__name__ == "GFSSModel" and model.config.base_class_names[0] == "circle-striped"
    processor = AutoImageProcessor.from_pretrained(out, backend="pil")
    assert processor.image_size == 64
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items() if k in saved)
    assert json.loads((out / "eval_results.json").read_text())["global_step"] == 16

    names = [c[0] for c in _FakeHfApi.calls]
    assert names == ["create_repo", "upload_folder"]
    upload = _FakeHfApi.calls[1][1]
    assert upload["repo_id"] == "user/tiny" and Path(upload["folder_path"]) == out
    assert "checkpoints/*" in upload["ignore_patterns"]


def _weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def test_stopped_and_resumed_run_matches_the_uninterrupted_one(tmp_path):
    common = dict(max_steps=7, gradient_accumulation_steps=2, eval_every_epochs=1, contrastive_weight=0.1)
    full = pretrain(tiny_config(tmp_path, "full", **common))
    assert full["completed"] and full["global_step"] == 7

    part = pretrain(tiny_config(tmp_path, "split", stop_after_steps=4, **common))
    assert not part["completed"] and part["global_step"] == 4
    assert not (tmp_path / "split" / "model.safetensors").exists()
    assert find_last_checkpoint(tmp_path / "split").name == "checkpoint-4"
    assert resolve_checkpoint("latest", tmp_path / "split") == tmp_path / "split" / "checkpoints" / "checkpoint-4"

    resumed = pretrain(tiny_config(tmp_path, "split", **common), resume_from_checkpoint="latest")
    assert resumed["completed"] and resumed["global_step"] == 7
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"]]
    logged = [json.loads(line)["step"] for line in (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 8))
    # The resumed run really trained: its weights moved away from the checkpoint.
    ckpt = load_file(tmp_path / "split" / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(ckpt[k], b[k]) for k in b if k in ckpt)


def test_contrastive_weight_zero_skips_the_projection(tmp_path):
    summary = pretrain(tiny_config(tmp_path, contrastive_weight=0.0, max_steps=2, eval_every_epochs=0))
    assert all(r["contrastive"] == 0.0 for r in summary["history"])
    assert not any(k.startswith("projection") for k in _weights(tmp_path / "run"))
