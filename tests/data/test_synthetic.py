import numpy as np
import pytest
from PIL import Image

from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import (
    SYNTHETIC_CLASSES,
    VAL_INDEX_OFFSET,
    SyntheticGFSS,
    SyntheticGFSSConfig,
    SyntheticSegmentation,
    parse_synthetic_id,
    render_sample,
)


def test_render_is_deterministic_and_seed_dependent():
    a_img, a_lab = render_sample(3, 17)
    b_img, b_lab = render_sample(3, 17)
    assert a_img.tobytes() == b_img.tobytes() and a_lab.tobytes() == b_lab.tobytes()
    assert a_img.shape == (96, 96, 3) and a_img.dtype == np.uint8 and a_lab.dtype == np.uint8
    c_img, _ = render_sample(4, 17)
    assert c_img.tobytes() != a_img.tobytes()
    big_img, big_lab = render_sample(3, 17, image_size=128)
    assert big_img.shape == (128, 128, 3) and big_lab.shape == (128, 128)


def test_covers_all_classes_and_objects_are_visible():
    seen = np.zeros(256, dtype=np.int64)
    for i in range(200):
        _, label = render_sample(0, i)
        present = np.unique(label)
        assert present.max() <= 20
        assert len(present) >= 2  # at least one object visible
        seen[present] += 1
    assert (seen[1:21] > 0).all(), "every class appears in 200 images"
    assert seen[21:].sum() == 0
    assert len(SYNTHETIC_CLASSES) == 20


def test_accessor_splits_ids_and_base_view():
    val = SyntheticSegmentation("val", num_images=6)
    train = SyntheticSegmentation("train", num_images=6)
    assert val.ids[0] == "val-000000" and parse_synthetic_id("val-000002") == VAL_INDEX_OFFSET + 2
    assert val[0]["image"].tobytes() != train[0]["image"].tobytes()
    assert val.get_by_id("val-000004")["label"].tobytes() == val[4]["label"].tobytes()

    split = get_split("synthetic", 1)
    base = SyntheticSegmentation("train", num_images=40, fold=1, view="base_train", return_pil=True)
    assert 0 < len(base) <= 40
    labels = [np.asarray(base[i]["label"]) for i in range(len(base))]
    assert isinstance(base[0]["image"], Image.Image) and base[0]["label"].mode == "L"
    for lab in labels:
        assert set(np.unique(lab).tolist()) <= set(range(len(split.base_ids) + 1)) | {255}
    index = train.class_index(min_pixels=1)
    assert set(index) == set(range(1, 21))


def test_builder_round_trip(tmp_path):
    builder = SyntheticGFSS(cache_dir=str(tmp_path), num_train=12, num_val=5, view="val", image_size=64)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="validation")
    assert len(ds) == 5 and ds[0]["id"] == "val-000000"
    image, label = render_sample(0, VAL_INDEX_OFFSET + 3, 64)
    assert np.array_equal(np.asarray(ds[3]["image"]), image)
    assert np.array_equal(np.asarray(ds[3]["label"]), label)

    config = SyntheticGFSSConfig(num_train=12, image_size=64, fold=2, view="base_train")
    builder = SyntheticGFSS.from_config(config, cache_dir=str(tmp_path))
    builder.download_and_prepare()
    train = builder.as_dataset(split="train")
    ref = SyntheticSegmentation("train", 12, 64, fold=2, view="base_train")
    assert train["id"] == ref.ids


def test_bad_arguments():
    with pytest.raises(ValueError, match="split='test'"):
        SyntheticSegmentation("test")
    with pytest.raises(ValueError, match="needs a fold"):
        SyntheticSegmentation(view="base_train")
    with pytest.raises(ValueError, match="view='x'"):
        SyntheticGFSSConfig(view="x")
