"""The pre-training loop: config loading, input errors before training, a short run, exact resume, outputs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from fixtures.make_tiny_model import TINY_SYNTHETIC_RUN
from safetensors.torch import load_file

from gfss_hf import GFSSConfig
from gfss_hf.checkpointing import find_last_checkpoint, resolve_checkpoint
from gfss_hf.training import build_model, build_pretraining_datasets, cosine_schedule, pretrain
from gfss_hf.training_config import TrainingConfig

REPO = Path(__file__).resolve().parents[1]

TINY = TINY_SYNTHETIC_RUN


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
        assert (config.model["backbone"], config.image_size, config.batch_size) == ("resnet50s", 473, 12)
        assert config.learning_rate == pytest.approx(2.5e-3) and config.contrastive_weight == pytest.approx(0.1)
        assert config.num_epochs == (100 if name == "pascal5i" else 20)


def test_unknown_keys_are_listed_with_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"dataset": "synthetic", "learning_rat": 0.1, "epochs": 3}))
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['epochs', 'learning_rat'\].*valid keys are: .*learning_rate"
    ):
        TrainingConfig.from_yaml(path)
    with pytest.raises(ValueError, match="unknown key"):
        TrainingConfig.from_yaml(REPO / "scripts" / "configs" / "synthetic.yaml", overrides=["nope=1"])


def test_overrides_are_parsed_as_yaml_and_bad_values_rejected():
    config = TrainingConfig.from_yaml(
        REPO / "scripts" / "configs" / "synthetic.yaml",
        overrides=[
            "max_steps=7",
            "base_temperature=0.07",
            "model.backbone_kwargs={channels: [8, 8, 8, 8]}",
            "hflip=false",
        ],
    )
    assert config.max_steps == 7 and config.base_temperature == 0.07 and config.hflip is False
    assert config.model["backbone_kwargs"] == {"channels": [8, 8, 8, 8]} and config.model["backbone"] == "resnet18"
    with pytest.raises(ValueError, match="key=value"):
        TrainingConfig.from_yaml(REPO / "scripts" / "configs" / "synthetic.yaml", overrides=["max_steps"])
    with pytest.raises(ValueError, match="contrastive_weight"):
        TrainingConfig(contrastive_weight=-1.0)
    with pytest.raises(ValueError, match="dataset"):
        TrainingConfig(dataset="imagenet")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("temperature", float("nan"), r"temperature=nan is invalid: expected a finite number"),
        ("contrastive_weight", float("inf"), r"contrastive_weight=inf is invalid: expected a finite number"),
        ("learning_rate", float("-inf"), r"learning_rate=-inf is invalid: expected a finite number"),
        ("base_temperature", float("nan"), r"base_temperature=nan is invalid: expected a finite number"),
        ("dropout", float("nan"), r"dropout=nan is invalid"),
        ("label_smoothing", float("inf"), r"label_smoothing=inf is invalid"),
        (
            "learning_rate",
            "abc",
            r"learning_rate='abc' is invalid: expected a finite number, got str; e.g. --set learnin",
        ),
        ("seed", "abc", r"seed='abc' is invalid: expected an integer, got str; e.g. --set seed=0"),
        ("seed", 1.5, r"seed=1.5 is invalid: expected an integer, got float"),
        ("num_epochs", True, r"num_epochs=True is invalid: expected an integer"),
        ("max_steps", "ten", r"max_steps='ten' is invalid: expected an integer or null"),
        ("hflip", "yes please", r"hflip='yes please' is invalid: expected true or false"),
        ("pool_scales", 3, r"pool_scales=3 is invalid: expected a list"),
    ],
)
def test_bad_values_name_the_key_the_value_and_the_expected_type(key, value, match):
    with pytest.raises(ValueError, match=match):
        TrainingConfig.from_dict({key: value})


def test_model_is_one_mapping_passed_to_gfss_config(tmp_path, caplog):
    # Unset model keys take GFSSConfig's defaults: they are declared there only.
    config = TrainingConfig.from_dict({"model": {"backbone": "test_resnet"}})
    assert config.model == {"backbone": "test_resnet"}
    assert config.model_settings["hidden_size"] == GFSSConfig().hidden_size and config.image_size == 473
    assert config.replace(model={"image_size": 64}).model == {"backbone": "test_resnet", "image_size": 64}
    # The flat keys of older configs (and of older checkpoints' training_config.yaml) are translated, with a warning.
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"backbone": "test_resnet", "hidden_size": 16, "num_epochs": 2}))
    with caplog.at_level("WARNING"):
        old = TrainingConfig.from_yaml(path, overrides=["model.image_size=64"])
    assert old.model == {"backbone": "test_resnet", "hidden_size": 16, "image_size": 64} and old.num_epochs == 2
    assert "deprecated; write them under `model:`" in caplog.text
    with pytest.raises(ValueError, match="sets the model's 'backbone' twice"):
        TrainingConfig.from_dict({"backbone": "a", "model": {"backbone": "b"}})
    with pytest.raises(ValueError, match=r"model has unknown key\(s\) \['fold'\]"):
        TrainingConfig.from_dict({"model": {"fold": 1}})
    with pytest.raises(
        ValueError, match=r"model.hidden_size='x' is invalid: expected an integer.*--set model.hidden_"
    ):
        TrainingConfig.from_dict({"model": {"hidden_size": "x"}})
    with pytest.raises(ValueError, match="GFSSConfig.hidden_size=0 is invalid"):
        TrainingConfig.from_dict({"model": {"hidden_size": 0}})
    # Choice fields are Literal[...] and validated from the annotation.
    with pytest.raises(ValueError, match=r"optimizer='adam' is invalid: allowed values are \['sgd', 'adamw'\]"):
        TrainingConfig.from_dict({"optimizer": "adam"})
    with pytest.raises(ValueError, match="mixed_precision='fp8' is invalid: allowed values"):
        TrainingConfig.from_dict({"mixed_precision": "fp8"})


def test_yaml_strings_that_spell_numbers_are_taken_as_floats():
    # YAML 1.1 reads 1e-3 (no dot) as a string.
    config = TrainingConfig.from_yaml(
        REPO / "scripts" / "configs" / "synthetic.yaml", overrides=["learning_rate=1e-3"]
    )
    assert config.learning_rate == 1e-3


@pytest.mark.parametrize(
    "text,match",
    [
        ("- a\n- b\n", "must hold a mapping of `key: value` lines, got list"),
        ("just some words\n", "must hold a mapping of `key: value` lines, got str"),
        (
            "learning_rat: 0.1\n",
            r"unknown key\(s\) \['learning_rat'\] in '.*c.yaml' \(did you mean 'learning_rat' -> 'le",
        ),
        ("seed: [1\n", "cannot be parsed"),
    ],
)
def test_bad_config_files_name_the_file_and_the_rule(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        TrainingConfig.from_yaml(path)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ("seed=3", None),  # one string is one override, not a sequence of one-character overrides
        (["sed=3"], r"unknown key\(s\) \['sed'\] in the overrides \(--set\) \(did you mean 'sed' -> 'seed'\?\)"),
        (
            ["model.backbone_kwargs=[1"],
            r"override 'model.backbone_kwargs=\[1': the value '\[1' of 'model.backbone_kwargs' is "
            "not valid YAML",
        ),
    ],
)
def test_overrides_errors_name_the_override(overrides, match):
    path = REPO / "scripts" / "configs" / "synthetic.yaml"
    if match is None:
        assert TrainingConfig.from_yaml(path, overrides=overrides).seed == 3
    else:
        with pytest.raises(ValueError, match=match):
            TrainingConfig.from_yaml(path, overrides=overrides)


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


@pytest.mark.parametrize(
    "dataset,match",
    [
        ("pascal5i", "JPEGImages"),
        ("coco20i", "instances_train2014.json"),
        ("folder", "images/"),
    ],
)
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
        kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())  # gone after the call
        _FakeHfApi.calls.append(("upload_folder", kwargs))
        return "https://huggingface.co/user/tiny/commit/abc"


def test_short_run_lowers_the_loss_saves_a_loadable_model_and_pushes(tmp_path, monkeypatch):
    import gfss_hf.hub

    # pretrain(push_to_hub=True) publishes like scripts/push_to_hub.py: stage -> check -> upload (gfss_hf.hub).
    monkeypatch.setattr(gfss_hf.hub, "HfApi", _FakeHfApi)
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
    # The staged export is uploaded, never the output folder: no checkpoints, logs or optimiser states.
    assert upload["repo_id"] == "user/tiny" and Path(upload["folder_path"]) != out
    assert {"model.safetensors", "config.json", "README.md", "modeling_gfss.py"} <= set(upload["files"])
    assert not {"checkpoints", "train_log.jsonl", "eval_results.json"} & set(upload["files"])
    assert summary["hub_commit"] == "https://huggingface.co/user/tiny/commit/abc"


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


def test_contrastive_warmup_ramps_lambda_linearly(tmp_path):
    """Each logged step's loss is ce + lambda_t * contrastive with lambda_t = lambda * (t + 1) / N during the ramp,
    then lambda; the schedule function says the same."""
    from gfss_hf.training import contrastive_weight

    config = tiny_config(
        tmp_path, contrastive_weight=0.4, contrastive_warmup_steps=4, max_steps=6, eval_every_epochs=0
    )
    assert [contrastive_weight(config, k) for k in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4])
    summary = pretrain(config)
    rows = summary["history"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert any(r["contrastive"] > 0 for r in rows)
    for r in rows:
        expected = r["ce"] + 0.4 * min(1.0, r["step"] / 4) * r["contrastive"]
        assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6), r
    with pytest.raises(ValueError, match="contrastive_warmup_steps"):
        tiny_config(tmp_path, contrastive_warmup_steps=-1)


# -- checkpoints: what they hold, what resume accepts ------------------------------------------------------------
RESUMABLE = dict(max_steps=7, gradient_accumulation_steps=2, logging_steps=3)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 4 of 7 (checkpoint-4, logging every 3 steps: step 4 sits inside a logging window) and
    the uninterrupted run, shared by the resume tests (which copy the stopped one)."""
    root = tmp_path_factory.mktemp("resumable")
    full = pretrain(tiny_config(root, "full", **RESUMABLE))
    pretrain(tiny_config(root, "split", stop_after_steps=4, **RESUMABLE))
    return {"root": root, "full": full, "split": root / "split"}


def _copy_run(stopped_run, tmp_path):
    import shutil

    target = tmp_path / "split"
    shutil.copytree(stopped_run["split"], target)
    return target, target / "checkpoints" / "checkpoint-4"


def test_checkpoint_files_are_safetensors_and_json_with_the_run_config(stopped_run):
    checkpoint = stopped_run["split"] / "checkpoints" / "checkpoint-4"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "process_state_0.safetensors", "trainer_state.json"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    config = tiny_config(stopped_run["root"], "split", stop_after_steps=4, **RESUMABLE)
    assert state["config"] == json.loads(json.dumps(config.to_dict()))
    assert state["scheduler"]["last_epoch"] == 4


def test_resumed_log_and_running_average_match_the_uninterrupted_run(stopped_run, tmp_path):
    out, _ = _copy_run(stopped_run, tmp_path)
    resumed = pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")
    # Step 6 averages steps 4-6; steps 4 and 5 straddle the checkpoint.
    assert [r["step"] for r in resumed["history"]] == [3, 6, 7]
    assert resumed["history"] == stopped_run["full"]["history"]
    a, b = _weights(stopped_run["root"] / "full"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change,named",
    [
        ({"learning_rate": 0.1}, "learning_rate: checkpoint 0.05, this run 0.1"),
        ({"seed": 3}, "seed: checkpoint 0, this run 3"),
        ({"contrastive_weight": 0.5}, "contrastive_weight: checkpoint 0.1, this run 0.5"),
        ({"hflip": False, "momentum": 0.5}, "hflip: checkpoint True, this run False; momentum: checkpoint 0.9"),
    ],
)
def test_resume_with_other_settings_is_refused_naming_the_keys(stopped_run, tmp_path, change, named):
    out, _ = _copy_run(stopped_run, tmp_path)
    before = (out / "training_config.yaml").read_text()
    config = tiny_config(tmp_path, "split", **{**RESUMABLE, **change})
    with pytest.raises(ValueError, match="was taken by a run with other settings") as info:
        pretrain(config, resume_from_checkpoint="latest")
    assert named in str(info.value) and "start a fresh run, use a new --output_dir" in str(info.value)
    assert (out / "training_config.yaml").read_text() == before  # nothing of the refused run was written
    # ... and a new run into that folder is refused the same way.
    with pytest.raises(ValueError, match=r"already holds checkpoints \(checkpoint-4\) of another run") as info:
        pretrain(config)
    assert named in str(info.value)


def test_checkpoint_of_an_older_version_is_refused(stopped_run, tmp_path):
    out, checkpoint = _copy_run(stopped_run, tmp_path)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["config"], state["format"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="written by an older gfss_hf .*pickles.*use a new --output_dir"):
        pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")


def test_resume_accepts_changed_infrastructure_keys(stopped_run, tmp_path):
    out, _ = _copy_run(stopped_run, tmp_path)
    config = tiny_config(
        tmp_path,
        "split",
        **{**RESUMABLE, "num_workers": 1, "eval_every_epochs": 0, "checkpointing_steps": 100, "report_to": "none"},
    )
    assert pretrain(config, resume_from_checkpoint="latest")["global_step"] == 7


class _Marker:
    """Unpickling this creates a marker file: proof that code from a checkpoint ran."""

    path = None

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def _malicious_pickle(marker):
    import pickle

    _Marker.path = marker
    return pickle.dumps(_Marker())


@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.safetensors", "process_state_0.safetensors", "trainer_state.json"]
)
def test_a_pickle_planted_in_a_checkpoint_file_is_refused_not_run(stopped_run, tmp_path, name):
    out, checkpoint = _copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    (checkpoint / name).write_bytes(_malicious_pickle(marker))
    with pytest.raises(ValueError, match=rf"checkpoint file '.*{name}' cannot be read.*earlier checkpoint"):
        pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")
    assert not marker.exists()


def test_pickles_added_to_a_checkpoint_are_never_loaded(stopped_run, tmp_path):
    # The files Accelerate's save_state writes (and this package wrote before) are ignored, whatever they hold.
    out, checkpoint = _copy_run(stopped_run, tmp_path)
    marker = tmp_path / "pwned"
    for name in (
        "custom_checkpoint_0.pkl",
        "optimizer.bin",
        "random_states_0.pkl",
        "scheduler.bin",
        "sampler.bin",
        "pytorch_model.bin",
        "scaler.pt",
    ):
        (checkpoint / name).write_bytes(_malicious_pickle(marker))
    resumed = pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")
    assert resumed["global_step"] == 7 and not marker.exists()


@pytest.mark.parametrize(
    "name", ["model.safetensors", "optimizer.safetensors", "process_state_0.safetensors", "trainer_state.json"]
)
def test_truncated_checkpoint_file_is_named(stopped_run, tmp_path, name):
    out, checkpoint = _copy_run(stopped_run, tmp_path)
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"checkpoint file '.*checkpoint-4/{name}' cannot be read.*truncated"):
        pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")


def test_full_disk_while_writing_a_checkpoint_names_the_file(tmp_path, monkeypatch):
    import errno

    import gfss_hf.checkpointing as checkpointing

    real = checkpointing._write_file

    def write(path, data):
        if path.name == "optimizer.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(checkpointing, "_write_file", write)
    with pytest.raises(OSError, match=r"no space left on device while writing checkpoint file '.*optimizer\.safet"):
        pretrain(tiny_config(tmp_path, max_steps=2, checkpointing_steps=1, eval_every_epochs=0))
    folder = tmp_path / "run" / "checkpoints"
    assert not list(folder.iterdir())  # the partial checkpoint is gone, `latest` finds nothing half-written


def test_torn_last_log_line_is_dropped_with_a_warning(stopped_run, tmp_path, monkeypatch):
    import gfss_hf.training as training

    out, _ = _copy_run(stopped_run, tmp_path)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "epoch": 1, "lo')
    warnings = []
    monkeypatch.setattr(training.logger, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")
    assert any("partial last line 2" in w for w in warnings), warnings
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [3, 6, 7]
    # A bad line that is not the last one is damage, not a torn write: an error naming the line.
    log.write_text('{"step": 3}\nnot json\n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"line 2 of '.*train_log.jsonl' is not a log record"):
        pretrain(tiny_config(tmp_path, "split", **RESUMABLE), resume_from_checkpoint="latest")


def test_non_finite_loss_stops_training_with_the_step(tmp_path):
    config = tiny_config(tmp_path, max_steps=12, learning_rate=1e12, contrastive_weight=0.0, eval_every_epochs=0)
    with pytest.raises(FloatingPointError, match=r"loss became non-finite at step \d+"):
        pretrain(config)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_rebuild_data_reaches_the_folder_builder(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from gfss_hf.data.folder import FolderSegmentation

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    for i in range(3):
        label = np.zeros((48, 48), dtype=np.uint8)
        label[4:40, 4:40] = i % 2 + 1
        Image.fromarray(np.full((48, 48, 3), 40 * i, dtype=np.uint8)).save(data / "images" / f"im{i}.png")
        Image.fromarray(label, "L").save(data / "masks" / f"im{i}.png")
    (data / "classes.json").write_text(json.dumps({"names": ["a", "b"], "folds": [["b"]]}))
    modes = []
    real = FolderSegmentation.download_and_prepare
    monkeypatch.setattr(
        FolderSegmentation,
        "download_and_prepare",
        lambda self, *a, **k: modes.append(k.get("download_mode")) or real(self, *a, **k),
    )
    config = tiny_config(
        tmp_path, dataset="folder", data_dir=str(data), cache_dir=str(tmp_path / "cache"), min_pixels=10
    )
    build_pretraining_datasets(config)
    train, _ = build_pretraining_datasets(config, rebuild_data=True)
    assert modes == [None, None, "force_redownload", "force_redownload"] and len(train) == 2


def test_run_outputs_get_the_modes_of_plain_writes(tmp_path, umask_027):
    import stat

    pretrain(tiny_config(tmp_path, max_steps=2, checkpointing_steps=2, eval_every_epochs=0, contrastive_weight=0.0))
    out = tmp_path / "run"
    files = [p for p in out.rglob("*") if p.is_file()]
    folders = [p for p in out.rglob("*") if p.is_dir()]
    assert {"model.safetensors", "training_config.yaml", "optimizer.safetensors"} <= {p.name for p in files}
    assert {
        p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o640
    } == {}
    assert {
        p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folders if stat.S_IMODE(p.stat().st_mode) != 0o750
    } == {}
