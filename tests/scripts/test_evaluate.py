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
from gfss_hf.data.episodes import episodes_hash, load_episodes
from gfss_hf.data.splits import CAMVID_CLASSES, get_split
from gfss_hf.metrics import metric_keys

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evaluate.py"
COMMON = [
    "--num_val_images",
    "60",
    "--num_train_images",
    "60",
    "--runs",
    "2",
    "--num_episodes",
    "8",
    "--episode_batch_size",
    "4",
    "--no_progress",
]
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
    argv = [
        str(pretrained_tiny_dir),
        "--config",
        str(config),
        "--output_dir",
        str(out),
        "--save_episodes",
        str(episodes_file),
        *COMMON,
    ]
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
    launch = [
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
        str(worker),
        str(SCRIPT),
        json.dumps(runs),
        str(report),
    ]
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
    single_process(
        [
            str(pretrained_tiny_dir),
            "--output_dir",
            str(out),
            "--save_episodes",
            str(episodes_file),
            "--steps",
            "6",
            "--num_val_images",
            "60",
            "--num_episodes",
            "16",
            "--no_progress",
        ]
    )
    spec = importlib.util.spec_from_file_location("replay", ROOT / "bench" / "replay_paper_protocol.py")
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    report = replay.replay(str(pretrained_tiny_dir), str(episodes_file), str(out / "results.json"), progress=False)
    assert report["num_episodes"] == 16
    for key, value in report["replayed"].items():
        assert 0.0 < value < 1.0, key  # something was predicted and scored, not a degenerate agreement
        # Procedural images at the model's canvas size: the pipeline's original-size maps are the protocol's maps.
        assert value == pytest.approx(report["reported"][key], abs=1e-9), key


# -- any dataset the builders support --------------------------------------------------------------------------------


def random_model_dir(path, base_class_names, **config):
    """A randomly initialised tiny model for the given base classes (the scoring path is what is tested)."""
    from fixtures.make_tiny_model import tiny_model_config

    from gfss_hf import GFSSImageProcessor, GFSSModel

    torch.manual_seed(0)
    cfg = tiny_model_config(base_class_names, image_size=64, **config)
    GFSSModel(cfg).eval().save_pretrained(path)
    GFSSImageProcessor.from_config(cfg).save_pretrained(path)
    return path


def camvid_folder(sample_data, root, num_train=8, num_val=12):
    """A folder dataset (images/, masks/, classes.json, train.txt, val.txt) from real CamVid scenes: class k -> k+1
    (CamVid has no background class, so 0 never occurs), void 11 -> 255."""
    import numpy as np
    from PIL import Image

    camvid = sample_data / "camvid"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for split, count in (("train", num_train), ("val", num_val)):
        names = sorted(p.name for p in (camvid / split).iterdir())[:count]
        for name in names:
            (root / "images" / name).write_bytes((camvid / split / name).read_bytes())
            label = np.asarray(Image.open(camvid / f"{split}annot" / name))
            Image.fromarray(np.where(label == 11, 255, label + 1).astype(np.uint8)).save(root / "masks" / name)
        (root / f"{split}.txt").write_text("".join(Path(n).stem + "\n" for n in names))
    (root / "classes.json").write_text(json.dumps({"names": CAMVID_CLASSES, "folds": [["Car", "Tree", "SignSymbol"]]}))
    return root


def test_folder_dataset_of_real_street_scenes_is_scored(sample_data, tmp_path):
    data = camvid_folder(sample_data, tmp_path / "camvid_folder")
    base = [n for n in CAMVID_CLASSES if n not in ("Car", "Tree", "SignSymbol")]
    model = random_model_dir(tmp_path / "model", base, dataset="folder")
    out = tmp_path / "out"
    payload = single_process(
        [
            str(model),
            "--dataset",
            "folder",
            "--data_dir",
            str(data),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--num_episodes",
            "6",
            "--steps",
            "2",
            "--output_dir",
            str(out),
            "--no_progress",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"] == "folder" and results["num_episodes"] == 6
    assert "12 images of the val list" in results["config"]["images"]
    for key in ("fss_novel_miou", "gfss_novel_miou", "gfss_base_miou"):
        assert 0.0 <= results["metrics"][key] <= 1.0, key
    assert payload["accumulators"]["fss"]["confusion"]  # pixels were scored


def test_coco_2017_layout_uses_the_annotation_files_images(sample_data, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # the COCO mask cache
    model = random_model_dir(tmp_path / "model", get_split("coco20i", 0).base_names, dataset="coco20i")
    out = tmp_path / "out"
    single_process(
        [
            str(model),
            "--dataset",
            "coco20i",
            "--data_dir",
            str(sample_data / "coco_tiny"),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--num_episodes",
            "4",
            "--steps",
            "2",
            "--output_dir",
            str(out),
            "--min_pixels",
            "256",
            "--no_progress",
        ]
    )
    results = json.loads((out / "results.json").read_text())
    # The standard COCO-20i val list names COCO 2014 files: a 2017 layout is evaluated on its own images, and says so.
    assert results["config"]["images"] == "all 80 images of instances_val2017.json"
    assert results["num_episodes"] == 4


# -- refused before any work -------------------------------------------------------------------------------------------
def _episodes_file(pretrained_tiny_dir, tmp_path):
    path = tmp_path / "episodes.json"
    single_process(
        [
            str(pretrained_tiny_dir),
            "--output_dir",
            str(tmp_path / "first"),
            "--save_episodes",
            str(path),
            "--steps",
            "1",
            "--num_val_images",
            "60",
            "--num_episodes",
            "4",
            "--no_progress",
        ]
    )
    return path


def _edit_first(field, value):
    def edit(data):
        data["episodes"][0][field] = value(data["episodes"][0]) if callable(value) else value
        return json.dumps(data)

    return edit


BASE_ID = get_split("synthetic", 0).base_ids[0]
BAD_EPISODE_FILES = [
    ("truncated", lambda data: json.dumps(data)[:-40], "not valid JSON"),
    (
        "missing key",
        lambda data: json.dumps(
            {**data, "episodes": [{k: v for k, v in e.items() if k != "query_id"} for e in data["episodes"]]}
        ),
        r"lacks \['query_id'\]",
    ),
    ("other dataset", _edit_first("dataset", "pascal5i"), "is from 'pascal5i' fold 0"),
    ("other fold", _edit_first("fold", 1), "fold 1, this evaluation is 'synthetic' fold 0"),
    ("other protocol", _edit_first("protocol", "diam"), r"holds \['diam', 'paper'\] episodes.*matching --protocol"),
    ("novel is a base class", _edit_first("class_ids", [BASE_ID]), "a base class of the model"),
    (
        "query among its supports",
        _edit_first("query_id", lambda e: next(iter(e["support_ids"].values()))[0]),
        "among its supports",
    ),
    ("unknown image id", _edit_first("query_id", "val-999999"), r"not in the val list"),
]


@pytest.mark.parametrize("name, edit, message", BAD_EPISODE_FILES, ids=[b[0] for b in BAD_EPISODE_FILES])
def test_bad_episode_files_are_refused_naming_the_rule(pretrained_tiny_dir, tmp_path, name, edit, message):
    path = _episodes_file(pretrained_tiny_dir, tmp_path)
    data = json.loads(path.read_text())
    if name == "novel is a base class":  # keep support_ids consistent with class_ids
        data["episodes"][0]["support_ids"] = {str(BASE_ID): next(iter(data["episodes"][0]["support_ids"].values()))}
    path.write_text(edit(data))
    out = tmp_path / "replayed"
    with pytest.raises(ValueError, match=message):
        single_process(
            [
                str(pretrained_tiny_dir),
                "--episodes",
                str(path),
                "--output_dir",
                str(out),
                "--steps",
                "1",
                "--num_val_images",
                "60",
                "--no_progress",
            ]
        )
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_dir_that_cannot_hold_results_is_refused_first(pretrained_tiny_dir, tmp_path, where, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    target = blocker if where == "file" else blocker / "sub"
    import gfss_hf.evaluation as evaluation

    def must_not_run(*args, **kwargs):
        raise AssertionError("the evaluation ran before the output folder was checked")

    monkeypatch.setattr(evaluation, "evaluate_episodes", must_not_run)
    with pytest.raises(SystemExit, match="output_dir"):
        single_process([str(pretrained_tiny_dir), "--output_dir", str(target), "--no_progress"])


def test_model_of_another_fold_is_refused_with_the_mismatch_spelled_out(pretrained_tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"the model has base classes \[.*\] that synthetic fold 1 does not"):
        single_process([str(pretrained_tiny_dir), "--fold", "1", "--output_dir", str(tmp_path / "o"), "--no_progress"])


def test_camvid_paper_protocol_with_supports_from_train(sample_data, tmp_path):
    from data.test_camvid import small_camvid

    data = small_camvid(sample_data, tmp_path / "camvid", num_train=8, num_val=12)
    split = get_split("camvid", 0)
    model = random_model_dir(tmp_path / "model", split.base_names, dataset="camvid")
    out, episodes_file = tmp_path / "out", tmp_path / "episodes.json"
    common = ["--dataset", "camvid", "--data_dir", str(data), "--cache_dir", str(tmp_path / "cache"), "--no_progress"]
    common += ["--num_episodes", "4", "--steps", "2", "--save_episodes", str(episodes_file)]
    single_process([str(model), *common, "--support_split", "train", "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["support_split"] == "train" and results["num_episodes"] == 4
    train_ids = {p.stem for p in (data / "train").iterdir()}
    val_ids = {p.stem for p in (data / "val").iterdir()}
    episodes = load_episodes(episodes_file)
    for e in episodes:
        assert e.support_split == "train" and e.query_id in val_ids
        assert set(e.all_support_ids()) <= train_ids
    # The default stays the published protocol: supports from val, the episode files as before (no new key).
    single_process([str(model), *common, "--output_dir", str(tmp_path / "out_val")])
    for e in load_episodes(episodes_file):
        assert e.support_split is None and set(e.all_support_ids()) <= val_ids
        assert "support_split" not in e.to_dict()
    with pytest.raises(SystemExit, match="paper protocol"):
        single_process([str(model), *common, "--protocol", "diam", "--support_split", "train"])
