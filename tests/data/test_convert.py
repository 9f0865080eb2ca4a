"""gfss_hf.data.convert and scripts/convert_dataset.py: COCO 2017 (real sample), CamVid (real sample, no background
class), a YOLO sample written here and a Cityscapes-like tree; the folders load with FolderSegmentation and their
pixel counts equal brute-force counts from the source labels."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gfss_hf.data.convert import (
    CAMVID_CLASSES,
    ClassMap,
    coco_samples,
    index_mask_samples,
    write_folder_dataset,
    yolo_samples,
)
from gfss_hf.data.folder import FolderSegmentation, read_folder_classes

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("convert_script", ROOT / "scripts" / "convert_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counts_of(label: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(label, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def load_folder(root: Path, tmp_path: Path, view="val") -> dict[str, np.ndarray]:
    """The labels of a converted folder, read through the folder builder."""
    builder = FolderSegmentation(
        cache_dir=str(tmp_path / "hf"), data_dir=str(root), fold=0, view=view, index_cache_dir=str(tmp_path / "index")
    )
    builder.download_and_prepare()
    data = builder.as_dataset(split="validation" if view == "val" else "train")
    return {ex["id"]: np.asarray(ex["label"]) for ex in data}


# -- COCO ------------------------------------------------------------------------------------------------------------
def test_coco_2017_sample_selected_and_renamed_classes_match_a_brute_force_count(sample_data, tmp_path):
    from pycocotools.coco import COCO

    coco_root = sample_data / "coco_tiny"
    out = tmp_path / "coco_folder"
    keep = ["person", "dog", "car", "cat"]
    load_script().main(
        [
            "coco",
            "--data_dir",
            str(coco_root),
            "--output_dir",
            str(out),
            "--classes",
            *keep,
            "--rename",
            "person=human",
            "--folds",
            "dog,cat",
            "car",
            "--no_progress",
        ]
    )
    classes = read_folder_classes(out)
    assert classes.names == ("human", "dog", "car", "cat")
    assert classes.folds == ((2, 4), (3,))
    labels = load_folder(out, tmp_path)
    assert len(labels) == 80

    # Brute force, from the instance JSON: every non-crowd instance painted in file order, kept classes only.
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(coco_root / "annotations" / "instances_val2017.json"))
    name_of = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    for info in coco.dataset["images"]:
        expected = np.zeros((info["height"], info["width"]), np.uint8)
        for ann in coco.dataset["annotations"]:
            if ann["image_id"] == info["id"] and not ann.get("iscrowd", 0):
                name = name_of[ann["category_id"]]
                expected[coco.annToMask(ann) > 0] = keep.index(name) + 1 if name in keep else 0
        stem = Path(info["file_name"]).stem
        assert counts_of(labels[stem]) == counts_of(expected), stem
        # Images are copied byte for byte.
        assert (out / "images" / info["file_name"]).read_bytes() == (
            coco_root / "val2017" / info["file_name"]
        ).read_bytes()
    assert sum(c.get(1, 0) for c in map(counts_of, labels.values())) > 0  # people were found


# -- CamVid: no background class ----------------------------------------------------------------------------------------
@pytest.fixture
def camvid_subset(sample_data, tmp_path):
    """Real CamVid files (symlinked) in the SegNet layout, a few per split."""
    src, root = sample_data / "camvid", tmp_path / "camvid"
    for split, count in (("train", 4), ("val", 3)):
        for sub in (split, f"{split}annot"):
            (root / sub).mkdir(parents=True)
        for path in sorted((src / split).iterdir())[:count]:
            (root / split / path.name).symlink_to(path)
            (root / f"{split}annot" / path.name).symlink_to(src / f"{split}annot" / path.name)
    return root


def test_camvid_without_background_class_k_to_k_plus_1_void_to_ignore(camvid_subset, tmp_path):
    names, samples = index_mask_samples(camvid_subset, names=CAMVID_CLASSES, has_background=False, void=[11])
    result = write_folder_dataset(tmp_path / "out", names, samples, has_background=False)
    assert result.names == CAMVID_CLASSES and len(result.train_ids) == 4 and len(result.val_ids) == 3
    assert json.loads((tmp_path / "out" / "classes.json").read_text())["has_background"] is False
    labels = load_folder(tmp_path / "out", tmp_path)
    for stem, label in labels.items():
        source = np.asarray(Image.open(camvid_subset / "valannot" / f"{stem}.png"))
        expected = {(255 if v == 11 else v + 1): n for v, n in Counter(source.reshape(-1).tolist()).items()}
        assert counts_of(label) == expected == result.pixel_counts[stem]
        assert 0 not in counts_of(label)  # no pixel of CamVid is background


def test_camvid_class_selection_unselected_to_background_or_ignore(camvid_subset, tmp_path):
    names, samples = index_mask_samples(camvid_subset, names=CAMVID_CLASSES, has_background=False, void=[11])
    result = write_folder_dataset(
        tmp_path / "bg", names, samples, classes=["Car", "Road"], rename={"Road": "street"}, num_folds=2
    )
    assert result.names == ("Car", "street")
    names, samples = index_mask_samples(camvid_subset, names=CAMVID_CLASSES, has_background=False, void=[11])
    ignored = write_folder_dataset(
        tmp_path / "ig", names, samples, classes=["Car", "Road"], unselected="ignore", num_folds=2
    )
    for stem in result.val_ids:
        source = np.asarray(Image.open(camvid_subset / "valannot" / f"{stem}.png"))
        car, road = int((source == 8).sum()), int((source == 3).sum())
        other = source.size - car - road - int((source == 11).sum())
        assert result.pixel_counts[stem] == {
            k: v for k, v in {0: other, 1: car, 2: road, 255: int((source == 11).sum())}.items() if v
        }
        assert ignored.pixel_counts[stem].get(255, 0) == source.size - car - road
        assert 0 not in ignored.pixel_counts[stem]


# -- YOLO --------------------------------------------------------------------------------------------------------------
def _norm(points, width, height):
    return " ".join(f"{x / width:.6f} {y / height:.6f}" for x, y in points)


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


@pytest.fixture
def yolo_sample(tmp_path):
    """A tiny Ultralytics segmentation dataset: rectangles at integer pixel corners, image sides powers of two (so
    the normalised coordinates are exact and the brute-force count is too), an overlap (the later line wins), an image without labels, and a phone photo with an EXIF rotation."""
    root = tmp_path / "yolo"
    for sub in ("images/train", "images/val", "labels/train", "labels/val"):
        (root / sub).mkdir(parents=True)
    (root / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n  0: cat\n  1: dog\n  2: bird\n"
    )
    rng = np.random.default_rng(0)
    expected = {}
    w, h = 64, 32
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images/train/a.png")
    (root / "labels/train/a.txt").write_text(
        f"0 {_norm(_rect(8, 4, 40, 20), w, h)}\n1 {_norm(_rect(30, 12, 60, 28), w, h)}\n"
    )
    label = np.zeros((h, w), np.uint8)
    label[4:21, 8:41] = 1
    label[12:29, 30:61] = 2
    expected["a"] = label
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images/train/b.jpg")
    expected["b"] = np.zeros((h, w), np.uint8)  # no label file: background
    # Stored 64 wide x 32 high, displayed rotated (EXIF 6): upright it is 32 x 64, and YOLO labels the upright frame.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / "images/val/c.jpg", exif=exif)
    (root / "labels/val/c.txt").write_text(f"2 {_norm(_rect(5, 10, 20, 50), 32, 64)}\n")
    label = np.zeros((64, 32), np.uint8)
    label[10:51, 5:21] = 3
    expected["c"] = label
    return root, expected


def test_yolo_polygons_match_a_brute_force_rasterisation(yolo_sample, tmp_path):
    root, expected = yolo_sample
    names, samples = yolo_samples(root)
    assert names == ["cat", "dog", "bird"]
    result = write_folder_dataset(tmp_path / "out", names, samples, num_folds=3)
    assert result.train_ids == ["a", "b"] and result.val_ids == ["c"] and not result.warnings
    for stem, label in expected.items():
        assert result.pixel_counts[stem] == counts_of(label), stem
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}.png")), label), stem
    # The rotated photo is stored upright, untagged, as PNG: every reader sees the frame its mask labels.
    with Image.open(tmp_path / "out" / "images" / "c.png") as image:
        assert image.size == (32, 64) and image.getexif().get(0x0112) is None
    labels = load_folder(tmp_path / "out", tmp_path)
    assert counts_of(labels["c"]) == counts_of(expected["c"])


def test_flat_yolo_folder_warns_that_train_and_val_are_the_same(yolo_sample, tmp_path):
    root, _ = yolo_sample
    flat = tmp_path / "flat"
    (flat / "images").mkdir(parents=True)
    (flat / "labels").mkdir()
    for stem in ("a", "b"):
        src = next((root / "images" / "train").glob(f"{stem}.*"))
        (flat / "images" / src.name).write_bytes(src.read_bytes())
    (flat / "labels" / "a.txt").write_text((root / "labels" / "train" / "a.txt").read_text())
    result = load_script().main(
        [
            "yolo",
            "--data_dir",
            str(flat),
            "--names",
            "cat",
            "dog",
            "--output_dir",
            str(tmp_path / "out"),
            "--no_progress",
        ]
    )
    assert result.train_ids == result.val_ids == ["a", "b"]
    assert any("train and val lists are the same 2 images" in w for w in result.warnings)


@pytest.mark.parametrize(
    "line, message",
    [
        ("0 0.5 0.5 0.2 0.2", "is a box"),
        ("5 0.1 0.1 0.5 0.1 0.5 0.5", "class 5 is not among the 3"),
        ("0 0.1 0.1 0.5", "even number of coordinates"),
        ("0 10 10 50 10 50 50", r"normalised to \[0, 1\]"),
    ],
)
def test_bad_yolo_lines_are_refused_naming_file_and_line(yolo_sample, tmp_path, line, message):
    root, _ = yolo_sample
    (root / "labels/train/b.txt").write_text(f"\n{line}\n")
    names, samples = yolo_samples(root)
    with pytest.raises(ValueError, match=rf"b\.txt:2\b.*{message}"):
        write_folder_dataset(tmp_path / "out", names, samples)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


# -- Cityscapes-like labelIds with a mapping --------------------------------------------------------------------------------
def test_cityscapes_label_ids_with_a_mapping(tmp_path):
    root = tmp_path / "city"
    rng = np.random.default_rng(1)
    expected = {}
    for split, city, stem in (("train", "aachen", "aachen_000000_000019"), ("val", "bonn", "bonn_000001_000019")):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        (root / "gtFine" / split / city).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(
            root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        )
        ids = rng.choice([0, 1, 7, 8, 24, 26], size=(16, 32)).astype(np.uint8)
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
        # road, road (sidewalk merged), car, person -> background; not listed -> ignore
        expected[stem] = np.select([np.isin(ids, [7, 8]), ids == 26, ids == 24], [1, 2, 0], 255)
    result = load_script().main(
        [
            "index",
            "--data_dir",
            str(root),
            "--mapping",
            "7=road",
            "8=road",
            "26=car",
            "24=background",
            "--output_dir",
            str(tmp_path / "out"),
            "--num_folds",
            "2",
            "--no_progress",
        ]
    )
    assert result.names == ("road", "car")
    for stem, label in expected.items():
        assert result.pixel_counts[stem] == counts_of(label)
    assert set(load_folder(tmp_path / "out", tmp_path)) == {"bonn_000001_000019"}


# -- refusals ----------------------------------------------------------------------------------------------------------
def test_class_selection_and_output_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"classes \['zebra'\] are not in the source"):
        ClassMap.build(["cat", "dog"], classes=["zebra"])
    with pytest.raises(ValueError, match=r"names \['pet'\] are given to several classes"):
        ClassMap.build(["cat", "dog"], rename={"cat": "pet", "dog": "pet"})
    with pytest.raises(ValueError, match="rename names"):
        ClassMap.build(["cat", "dog"], classes=["cat"], rename={"dog": "hound"})
    with pytest.raises(ValueError, match="named 'background'"):
        ClassMap.build(["cat", "background"])
    with pytest.raises(ValueError, match=r"values \[9\] that are no source class"):
        ClassMap.build(["cat", "dog"]).apply(np.array([[0, 9]], np.uint8))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="is not empty"):
        write_folder_dataset(tmp_path / "full", ["cat", "dog"], iter([]))
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is an existing file"):
        write_folder_dataset(tmp_path / "file", ["cat", "dog"], iter([]))
    with pytest.raises(ValueError, match=r"folds name \['cow'\]"):
        write_folder_dataset(tmp_path / "new", ["cat", "dog"], iter([]), folds=[["cow"]])


def test_index_mask_values_not_declared_are_refused(tmp_path):
    root = tmp_path / "camvid_like"
    for sub in ("train", "trainannot"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "train" / "x.png")
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(root / "trainannot" / "x.png")
    names, samples = index_mask_samples(root, names=["a", "b"], has_background=False, void=[11])
    with pytest.raises(ValueError, match=r"holds values \[40\] that are neither classes nor void"):
        write_folder_dataset(tmp_path / "out", names, samples)


def test_coco_json_with_a_missing_image_is_refused_before_any_work(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "gone.jpg", "height": 4, "width": 4}],
                "annotations": [],
                "categories": [{"id": 3, "name": "cat"}],
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        coco_samples({"train": (ann, tmp_path)})
