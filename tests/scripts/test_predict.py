"""scripts/predict.py end to end: learn once from supports, segment real CamVid and COCO images, write palette label
maps, overlays with a legend and predictions.json; persist the learned classes; refuse bad arguments before any
work."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gfss_hf.data.splits import get_split
from gfss_hf.visualization import make_palette

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "predict.py"
CAMVID_BASE = ["Sky", "Building", "Road", "Pavement", "Tree", "Pedestrian"]  # "Car" is learned from a support
FAST = ["--steps", "3", "--no_progress"]


def load_script():
    spec = importlib.util.spec_from_file_location("predict_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return load_script().main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def tiny_random_model(path, base_class_names):
    """A randomly initialised tiny model (64 px) whose base classes are `base_class_names`."""
    from fixtures.make_tiny_model import tiny_model_config

    from gfss_hf import GFSSImageProcessor, GFSSModel

    torch.manual_seed(0)
    config = tiny_model_config(base_class_names, image_size=64, dataset="folder")
    GFSSModel(config).eval().save_pretrained(path)
    GFSSImageProcessor.from_config(config).save_pretrained(path)
    return path


def check_outputs(out: Path, payload: dict, queries: list[Path]):
    """Every query has a palette label PNG matching predictions.json and an overlay with a legend strip."""
    assert json.loads((out / "predictions.json").read_text()) == payload
    id2label = {int(k): v for k, v in payload["id2label"].items()}
    assert [Path(r["file"]) for r in payload["queries"]] == [q.absolute() for q in queries]
    umask = os.umask(0)
    os.umask(umask)
    for record, query in zip(payload["queries"], queries):
        with Image.open(out / record["label_map"]) as label_png:
            assert label_png.mode == "P"
            assert label_png.getpalette()[: 3 * 256] == make_palette().reshape(-1).tolist()
            labels = np.asarray(label_png)
        with Image.open(query) as original:
            assert labels.shape == (original.height, original.width) == (record["height"], record["width"])
        ids, counts = np.unique(labels, return_counts=True)
        assert [c["id"] for c in record["classes"]] == ids.tolist()
        assert [c["pixels"] for c in record["classes"]] == counts.tolist()
        assert sum(c["pixels"] for c in record["classes"]) == labels.size
        for entry in record["classes"]:
            assert entry["label"] == id2label[entry["id"]] and 0.0 < entry["score"] <= 1.0
        with Image.open(out / record["overlay"]) as picture:
            assert picture.width > record["width"]  # the legend strip beside the image
            strip = {tuple(c) for c in np.asarray(picture.convert("RGB"))[:, record["width"] :].reshape(-1, 3)}
        assert all(tuple(make_palette()[i]) in strip for i in ids)  # a swatch for each class present
        assert stat.S_IMODE((out / record["overlay"]).stat().st_mode) == 0o666 & ~umask
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_camvid_learn_car_once_predict_many_and_persist(sample_data, tmp_path, monkeypatch):
    camvid = sample_data / "camvid"
    model = tiny_random_model(tmp_path / "model", CAMVID_BASE)
    support = sorted((camvid / "train").iterdir())[0]
    car = (np.asarray(Image.open(camvid / "trainannot" / support.name)) == 8).astype(np.uint8)  # 8 = Car
    assert car.sum() > 1000
    Image.fromarray(car).save(tmp_path / "car.png")
    queries_dir = tmp_path / "queries"
    queries_dir.mkdir()
    queries = []
    for path in sorted((camvid / "val").iterdir())[:3]:
        (queries_dir / path.name).symlink_to(path)
        queries.append(queries_dir / path.name)

    from gfss_hf import FewShotSegmentationPipeline

    learn, calls = FewShotSegmentationPipeline.learn, []

    def counting_learn(self, *args, **kwargs):
        calls.append(kwargs)
        return learn(self, *args, **kwargs)

    monkeypatch.setattr(FewShotSegmentationPipeline, "learn", counting_learn)
    out, persisted = tmp_path / "out", tmp_path / "with_car"
    payload = run(
        [
            model,
            "--support_images",
            support,
            "--support_masks",
            tmp_path / "car.png",
            "--class_names",
            "Car",
            "--queries",
            queries_dir,
            "--output_dir",
            out,
            "--persist_to",
            persisted,
            "--gamma",
            "5",
            "--kd_skip_novel",
            *FAST,
        ]
    )
    assert len(calls) == 1  # learned once for three queries
    assert calls[0]["gamma"] == 5.0 and calls[0]["kd_skip_novel"] is True and calls[0]["steps"] == 3
    assert payload["id2label"] == {str(i): n for i, n in enumerate(["background", *CAMVID_BASE, "Car"])}
    assert payload["settings"]["adaptation"]["gamma"] == 5.0 and payload["settings"]["mode"] == "gfss"
    check_outputs(out, payload, queries)

    # The persisted model knows "Car" without supports; its folder was renamed into place with a normal mode.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(persisted.stat().st_mode) == 0o777 & ~umask
    assert not list(tmp_path.glob(".with_car.*"))
    config = json.loads((persisted / "config.json").read_text())
    assert "Car" in config["id2label"].values()
    again = run([persisted, "--queries", queries[0], "--output_dir", tmp_path / "out2", *FAST])
    assert again["id2label"] == payload["id2label"] and again["settings"]["mode"] == "model"
    check_outputs(tmp_path / "out2", again, queries[:1])


def test_coco_image_with_the_models_classes_and_in_fss_mode(sample_data, tmp_path):
    from gfss_hf.data.coco import CocoSemanticMasks

    coco = sample_data / "coco_tiny"
    model = tiny_random_model(tmp_path / "model", get_split("coco20i", 0).base_names)
    masks = CocoSemanticMasks(coco, "val", cache_dir=tmp_path / "cache")
    ids = masks.image_ids()
    support_id, query_id = ids[0], ids[1]
    label = masks.mask(support_id)
    cls = int(np.bincount(label[label > 0]).argmax())  # the support's largest class
    Image.fromarray((label == cls).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    query = masks.image_path(query_id)
    plain = run([model, "--queries", query, "--output_dir", tmp_path / "plain", *FAST])
    assert len(plain["id2label"]) == 1 + 60  # background + the 60 base classes of fold 0
    check_outputs(tmp_path / "plain", plain, [query])
    fss = run(
        [
            model,
            "--support_images",
            masks.image_path(support_id),
            "--support_masks",
            tmp_path / "mask.png",
            "--class_names",
            "thing",
            "--mode",
            "fss",
            "--queries",
            str(coco / "val2017" / f"{query_id}.*"),
            "--output_dir",
            tmp_path / "fss",
            *FAST,
        ]
    )
    assert fss["id2label"] == {"0": "background", "1": "thing"}
    check_outputs(tmp_path / "fss", fss, [query])


def test_synthetic_images_without_sample_data(pretrained_tiny_dir, tmp_path):
    """The same path on procedural images, so that it is covered where GFSS_SAMPLE_DATA is not set."""
    from gfss_hf.data.synthetic import SyntheticSegmentation

    split = get_split("synthetic", 0)
    data = SyntheticSegmentation("val", num_images=30, image_size=96, seed=0)
    cid = split.novel_ids[0]
    rich = [i for i in range(len(data)) if (data[i]["label"] == cid).sum() >= 300][:3]
    for k, i in enumerate(rich):
        Image.fromarray(data[i]["image"]).save(tmp_path / f"img{k}.png")
    Image.fromarray((data[rich[0]]["label"] == cid).astype(np.uint8)).save(tmp_path / "mask0.png")
    queries = [tmp_path / "img1.png", tmp_path / "img2.png"]
    # A file named twice (by itself and by a glob) is segmented once.
    payload = run(
        [
            pretrained_tiny_dir,
            "--support_images",
            tmp_path / "img0.png",
            "--support_masks",
            tmp_path / "mask0.png",
            "--class_names",
            split.novel_names[0],
            "--queries",
            queries[0],
            str(tmp_path / "img[12].png"),
            "--output_dir",
            tmp_path / "out",
            *FAST,
        ]
    )
    assert payload["id2label"][str(len(payload["id2label"]) - 1)] == split.novel_names[0]
    check_outputs(tmp_path / "out", payload, queries)


def test_fine_tuning_flags_are_the_adaptation_config_fields():
    import dataclasses

    from gfss_hf.adaptation import AdaptationConfig

    script = load_script()
    defaults = vars(script.parse_args(["m", "--queries", "q", "--output_dir", "o"]))
    for field in dataclasses.fields(AdaptationConfig):
        if field.name == "method":
            assert field.name not in defaults
        else:
            assert defaults[field.name] == field.default, field.name
    parsed = script.parse_args(
        [
            "m",
            "--queries",
            "q",
            "--output_dir",
            "o",
            "--normalize_features",
            "--lr",
            "0.5",
            "--ce_weighting",
            "reference",
            "--novel_init",
            "prototype",
        ]
    )
    assert parsed.normalize_features is True and parsed.lr == 0.5 and parsed.ce_weighting == "reference"


@pytest.fixture
def files(tmp_path):
    Image.new("RGB", (32, 24), "gray").save(tmp_path / "a.jpg")
    Image.new("L", (32, 24), 1).save(tmp_path / "a.png")
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    return tmp_path


BAD = [
    (["--queries", "{d}/nothing*.jpg"], r"no query image found for --queries '.*/nothing\*\.jpg'"),
    (["--queries", "{d}/missing.jpg"], "neither a file, a folder nor a glob"),
    (
        ["--support_images", "{d}/a.jpg", "{d}/a.jpg", "--support_masks", "{d}/a.png", "--class_names", "x"],
        "2 --support_images but 1 --support_masks",
    ),
    (
        [
            "--support_images",
            "{d}/a.jpg",
            "{d}/a.jpg",
            "--support_masks",
            "{d}/a.png",
            "{d}/a.png",
            "--class_names",
            "x",
            "y",
            "z",
        ],
        "3 --class_names for 2 supports",
    ),
    (["--support_images", "{d}/a.jpg", "--support_masks", "{d}/a.png"], "--class_names missing"),
    (["--output_dir", "{d}/a_file"], "is an existing file, not a folder"),
    (
        [
            "--support_images",
            "{d}/a.jpg",
            "--support_masks",
            "{d}/a.png",
            "--class_names",
            "x",
            "--persist_to",
            "{d}/full",
        ],
        "is not an empty folder",
    ),
    (
        [
            "--support_images",
            "{d}/a.jpg",
            "--support_masks",
            "{d}/a.png",
            "--class_names",
            "x",
            "--persist_to",
            "{d}/new",
            "--mode",
            "fss",
        ],
        "needs --mode gfss",
    ),
    (["--steps", "-1"], r"AdaptationConfig.steps=-1 is invalid"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[f"bad{k}" for k in range(len(BAD))])
def test_bad_arguments_are_refused_before_the_model_is_loaded(files, extra, message, monkeypatch):
    script = load_script()

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(script, "pipeline", must_not_load)
    argv = ["model", "--queries", str(files / "a.jpg"), "--output_dir", str(files / "out")]
    argv += [e.format(d=files) for e in extra]
    with pytest.raises((SystemExit, ValueError), match=message):
        script.main(argv)
