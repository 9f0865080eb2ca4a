"""Builders on real-format data from $GFSS_SAMPLE_DATA (skipped when unset)."""

import json

import numpy as np
import pytest
from PIL import Image

from gfss_hf.data.coco import Coco20i, CocoSemanticMasks, coco_class_index
from gfss_hf.data.pascal import Pascal5i, Pascal5iConfig, pascal_class_index, read_pascal_list
from gfss_hf.data.splits import get_split


@pytest.fixture(scope="module")
def voc(sample_data):
    return sample_data / "pascal" / "VOCdevkit" / "VOC2012"


@pytest.fixture(scope="module")
def three_ids(voc):
    return voc / "ImageSets" / "Segmentation" / "train.txt"


def test_pascal_builder_reads_the_real_pairs(tmp_path, voc, three_ids):
    config = Pascal5iConfig(data_dir=str(voc), fold=0, view="val", val_list=str(three_ids))
    builder = Pascal5i.from_config(config, cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset(split="validation")
    assert ds["id"] == ["2011_000003", "2011_000006", "2011_000025"]
    for ex in ds:
        with Image.open(voc / "JPEGImages" / f"{ex['id']}.jpg") as im:
            assert ex["image"].mode == "RGB" and np.array_equal(np.asarray(ex["image"]), np.asarray(im.convert("RGB")))
        with Image.open(voc / "SegmentationClassAug" / f"{ex['id']}.png") as im:
            assert ex["label"].mode == "L" and np.array_equal(np.asarray(ex["label"]), np.asarray(im))


def test_pascal_base_training_view_has_no_novel_label(tmp_path, voc, three_ids):
    split = get_split("pascal5i", 0)
    builder = Pascal5i(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(voc),
        fold=0,
        view="base_train",
        train_list=str(three_ids),
        index_cache_dir=str(tmp_path / "index"),
    )
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    assert len(ds) >= 1
    for ex in ds:
        values = set(np.unique(np.asarray(ex["label"])).tolist())
        assert values <= set(range(len(split.base_ids) + 1)) | {255}
        with Image.open(voc / "SegmentationClassAug" / f"{ex['id']}.png") as im:
            raw = np.asarray(im)
        assert (np.asarray(ex["label"])[np.isin(raw, split.novel_ids)] == 255).all()


def test_pascal_class_index_matches_brute_force_on_the_val_list(tmp_path, voc):
    split = get_split("pascal5i", 0)
    index = pascal_class_index(voc, "val", min_pixels=2048, cache_dir=tmp_path)
    entries = read_pascal_list("val")
    assert len(entries) == 1449
    expected = {c: [] for c in range(1, 21)}
    for image_id, _, mask in sorted(entries):
        with Image.open(voc / mask) as im:
            label = np.asarray(im)
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()
        assert set(present) <= set(range(21)) | {255}
        for c in present:
            if 0 < c < 255 and (label == c).sum() >= 2048:
                expected[c].append(image_id)
        base = split.to_base_training(label)
        assert not np.isin(base, np.arange(16, 255)).any()  # base-training labels: 0..15 and 255 only
    assert index == expected
    assert sum(map(len, index.values())) > 1449 // 2
    # second call comes from the JSON cache and agrees
    assert pascal_class_index(voc, "val", min_pixels=2048, cache_dir=tmp_path) == expected
    assert len(list(tmp_path.glob("pascal-*.json"))) == 1


def test_standard_lists_name_existing_masks(voc):
    for split in ("train", "val"):
        entries = read_pascal_list(split)
        assert len(entries) == {"train": 5953, "val": 1449}[split]
        assert all((voc / mask).is_file() for _, _, mask in entries)


def _brute_force_coco(ann_file):
    from pycocotools import mask as mask_utils

    data = json.loads(ann_file.read_text())
    rank = {c["id"]: r + 1 for r, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    out = {}
    for img in data["images"]:
        label = np.zeros((img["height"], img["width"]), dtype=np.uint8)
        for ann in data["annotations"]:  # annotation order
            if ann["image_id"] != img["id"] or ann["iscrowd"]:
                continue
            seg = ann["segmentation"]
            if isinstance(seg, list):
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
            elif isinstance(seg["counts"], list):
                rle = mask_utils.frPyObjects(seg, img["height"], img["width"])
            else:
                rle = seg
            label[mask_utils.decode(rle) > 0] = rank[ann["category_id"]]
        out[img["file_name"].rsplit(".", 1)[0]] = label
    return out


def test_coco_masks_equal_brute_force(tmp_path, sample_data):
    root = sample_data / "coco_tiny"
    expected = _brute_force_coco(root / "annotations" / "instances_val2017.json")
    masks = CocoSemanticMasks(root, "val", cache_dir=tmp_path)
    assert masks.year == 2017 and len(masks.image_ids()) == 80
    seen = set()
    for image_id in masks.image_ids():
        got = masks.mask(image_id)
        assert np.array_equal(got, expected[image_id]), image_id
        assert np.array_equal(masks.mask(image_id), got)  # cached PNG reads back the same
        seen |= set(np.unique(got).tolist())
    assert seen <= set(range(81)) and len(seen) > 70  # ~one image per category; a few are crowd-only or covered
    assert not list(tmp_path.rglob("*.tmp"))
    index = coco_class_index(root, "val", min_pixels=2048, cache_dir=tmp_path)
    for c, ids in index.items():
        assert ids == sorted(i for i, lab in expected.items() if (lab == c).sum() >= 2048)


def test_coco_builder_views(tmp_path, sample_data):
    root = sample_data / "coco_tiny"
    kwargs = dict(cache_dir=str(tmp_path / "cache"), data_dir=str(root), fold=1, index_cache_dir=str(tmp_path))
    builder = Coco20i(view="base_train", **kwargs)
    builder.download_and_prepare()
    ds = builder.as_dataset(split="train")
    split = get_split("coco20i", 1)
    assert 0 < len(ds) <= 80
    for ex in ds.select(range(10)):
        assert set(np.unique(np.asarray(ex["label"])).tolist()) <= set(range(61)) | {255}
    crowd = CocoSemanticMasks(root, "train", crowd_to_ignore=True, cache_dir=tmp_path)
    plain = CocoSemanticMasks(root, "train", cache_dir=tmp_path)
    assert crowd.mask_dir != plain.mask_dir
    assert len(split.novel_ids) == 20


def test_phone_jpeg_size_matches_the_decoded_example(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6: the builders' reader and `datasets`' decoding of the stored
    bytes agree on the displayed size, so its (displayed-size) mask fits."""
    import datasets

    from gfss_hf.data._builder import image_feature_value, read_rgb

    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "phone.jpg", exif=exif)
    assert read_rgb(tmp_path / "phone.jpg").size == (20, 30)
    value, (height, width) = image_feature_value(tmp_path / "phone.jpg")
    assert isinstance(value, dict)  # an RGB JPEG is stored as its original bytes, EXIF included
    decoded = datasets.Image().decode_example(value)
    assert (height, width) == (30, 20) == (decoded.height, decoded.width)
