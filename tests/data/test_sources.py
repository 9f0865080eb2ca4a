"""The dataset registry: one entry per dataset, the one name list, and its errors."""

import json

import numpy as np
import pytest
from PIL import Image

from gfss_hf.data.episodes import PROTOCOLS, default_min_pixels
from gfss_hf.data.sources import (
    DATA_SOURCES,
    DATASET_NAMES,
    check_data_dir,
    get_data_source,
    load_fold_split,
    load_image_source,
)
from gfss_hf.data.splits import SPLIT_DATASETS


def test_every_fold_table_and_the_folder_are_registered():
    assert set(DATASET_NAMES) == set(SPLIT_DATASETS) | {"folder"}
    assert [name for name, source in DATA_SOURCES.items() if not source.needs_data_dir] == ["synthetic"]
    with pytest.raises(ValueError, match=r"dataset='voc' is not known; use one of \['synthetic'"):
        get_data_source("voc")


def test_fold_split_and_layout_errors(tmp_path):
    assert load_fold_split("coco20i", 1, "consecutive").novel_ids == tuple(range(21, 41))
    with pytest.raises(ValueError, match="needs data_dir"):
        load_fold_split("folder", 0)
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        check_data_dir("pascal5i", str(tmp_path))
    data = tmp_path / "mine"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    label = np.zeros((32, 32), dtype=np.uint8)
    label[:16] = 2
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(data / "images" / "a.png")
    Image.fromarray(label, "L").save(data / "masks" / "a.png")
    (data / "classes.json").write_text(json.dumps({"names": ["cat", "dog"], "folds": [["dog"]]}))
    check_data_dir("folder", str(data))
    assert load_fold_split("folder", 0, data_dir=str(data)).novel_names == ("dog",)


def test_synthetic_image_source_and_thresholds():
    val = load_image_source("synthetic", "val", num_images=4, image_size=48)
    assert len(val.ids) == 4 and val.image_size == 48
    with pytest.raises(ValueError, match="is read from disk"):
        load_image_source("pascal5i", "val")
    assert [default_min_pixels(p, "pascal5i") for p in PROTOCOLS] == [2048, 16384, 2048]
    assert default_min_pixels("paper", "synthetic", image_size=192) == 256
    with pytest.raises(ValueError, match="image_area"):
        default_min_pixels("paper", "folder")
