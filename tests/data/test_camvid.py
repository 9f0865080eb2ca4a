"""The CamVid builder, its registry entry and its fold table, checked on the real images (`GFSS_SAMPLE_DATA`)."""

import os

import numpy as np
import pytest
from PIL import Image

from gfss_hf.data import CAMVID_CLASSES, get_split
from gfss_hf.data.camvid import CamVid, camvid_class_statistics, read_camvid_label
from gfss_hf.data.episodes import default_min_pixels
from gfss_hf.data.sources import DATASET_NAMES, build_view, check_data_dir, load_fold_split, load_image_source

# The numbers documented beside CAMVID_FOLDS (gfss_hf/data/splits.py): pixel share (%) and images >= 1,582 px.
DOCUMENTED = {
    "Road": (32.96, 367),
    "Building": (24.21, 352),
    "Sky": (17.54, 364),
    "Tree": (10.12, 309),
    "Car": (6.11, 292),
    "Pavement": (4.67, 306),
    "SignSymbol": (1.22, 157),
    "Fence": (1.17, 101),
    "Pole": (1.02, 158),
    "Pedestrian": (0.67, 82),
    "Bicyclist": (0.30, 40),
}


def small_camvid(sample_data, root, num_train=4, num_val=3):
    """A CamVid folder of the first few real images, linked (not copied) from the sample data."""
    src = sample_data / "camvid"
    for split, num in (("train", num_train), ("val", num_val)):
        for sub in (split, f"{split}annot"):
            (root / sub).mkdir(parents=True)
            for path in sorted((src / sub).iterdir())[:num]:
                os.symlink(path, root / sub / path.name)
    return root


def test_fold_table():
    assert "camvid" in DATASET_NAMES
    large, thin = get_split("camvid", 0), get_split("camvid", 1)
    assert large.class_names == CAMVID_CLASSES and len(CAMVID_CLASSES) == 11
    assert large.novel_names == ("Tree", "SignSymbol", "Car") and large.novel_ids == (6, 7, 9)
    assert thin.novel_names == ("Pole", "Pedestrian", "Bicyclist") and thin.novel_ids == (3, 10, 11)
    assert load_fold_split("camvid", 1) == thin
    with pytest.raises(ValueError, match="folds \\[0, 1\\]"):
        get_split("camvid", 2)
    # No published threshold for CamVid: the paper's share of a 480x360 canvas, not PASCAL's 2,048 px.
    assert default_min_pixels("paper", "camvid", image_area=480 * 360) == 1582


def test_layout_error_names_the_missing_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        check_data_dir("camvid", str(tmp_path))
    for sub in ("trainannot", "val", "valannot"):
        assert str(tmp_path / sub) in str(err.value)
    assert f"{str(tmp_path / 'train')!r}" not in str(err.value)


def test_void_and_unknown_values(tmp_path):
    raw = np.array([[0, 5, 10, 11]], dtype=np.uint8)
    Image.fromarray(raw, "L").save(tmp_path / "a.png")
    assert read_camvid_label(tmp_path / "a.png").tolist() == [[1, 6, 11, 255]]
    Image.fromarray(np.array([[0, 12]], dtype=np.uint8), "L").save(tmp_path / "b.png")
    with pytest.raises(ValueError, match="values \\[12\\]"):
        read_camvid_label(tmp_path / "b.png")


def test_views_match_the_label_pngs(sample_data, tmp_path):
    root = small_camvid(sample_data, tmp_path / "camvid")
    cache = str(tmp_path / "cache")
    val = build_view("camvid", "val", fold=0, data_dir=str(root), cache_dir=cache)
    assert val["id"] == sorted(p.stem for p in (root / "val").iterdir())
    split = get_split("camvid", 0)
    for ex in val:
        with Image.open(root / "valannot" / f"{ex['id']}.png") as im:
            raw = np.asarray(im)
        with Image.open(root / "val" / f"{ex['id']}.png") as im:
            assert np.array_equal(np.asarray(ex["image"]), np.asarray(im.convert("RGB")))
        label = np.asarray(ex["label"])
        # Brute force, pixel by pixel over the value set: k -> k + 1, 11 -> 255.
        expected = np.full(raw.shape, 255, dtype=np.uint8)
        for k in range(11):
            expected[raw == k] = k + 1
        assert np.array_equal(label, expected) and 0 not in label
    base = build_view("camvid", "base_train", fold=0, data_dir=str(root), cache_dir=cache)
    assert 0 < len(base) <= 4
    for ex in base:
        with Image.open(root / "trainannot" / f"{ex['id']}.png") as im:
            raw = np.asarray(im).astype(int)
        label = np.asarray(ex["label"])
        # No background in CamVid: base labels are rank + 1, novel (Tree, SignSymbol, Car) and void ignored.
        assert 0 not in label
        assert np.all(label[np.isin(raw, [5, 6, 8, 11])] == 255)
        for rank, cid in enumerate(split.base_ids):
            assert np.all(label[raw == cid - 1] == rank + 1)
    source = load_image_source("camvid", "val", fold=0, data_dir=str(root), cache_dir=cache)
    assert source.ids == val["id"] and source.median_image_area() == 480 * 360
    first = source.get_by_id(source.ids[0])
    assert set(source.pixel_counts()[source.ids[0]]) == set(np.unique(first["label"]).tolist()) - {255}


def test_statistics_reproduce_the_documented_folds(sample_data):
    stats = camvid_class_statistics(sample_data / "camvid", cache_dir="")
    for name, (share, images) in DOCUMENTED.items():
        assert round(stats[name]["pixel_share"], 2) == share and stats[name]["images"] == images, name
    # The rules of CAMVID_FOLDS: thin = the three smallest shares; large = the most-present remaining objects.
    smallest = sorted(stats, key=lambda n: stats[n]["pixel_share"])[:3]
    assert set(smallest) == set(get_split("camvid", 1).novel_names)
    objects = [n for n in stats if n not in {"Sky", "Building", "Road", "Pavement", *smallest}]
    assert set(sorted(objects, key=lambda n: -stats[n]["images"])[:3]) == set(get_split("camvid", 0).novel_names)


def test_builder_class_is_registered():
    from gfss_hf.data.sources import get_data_source

    assert get_data_source("camvid").builder(data_dir=None).__class__ is CamVid


def test_cpu_recipe_loads():
    from pathlib import Path

    from gfss_hf.training_config import TrainingConfig

    config = TrainingConfig.from_yaml(Path(__file__).resolve().parents[2] / "scripts" / "configs" / "camvid.yaml")
    assert config.dataset == "camvid" and config.image_size == 240 and config.optimizer == "adamw"
    assert config.scale_range == [0.75, 1.5] and config.color_jitter > 0 and config.hflip
    assert config.model["backbone"] == "resnet18" and config.min_pixels == 1582
