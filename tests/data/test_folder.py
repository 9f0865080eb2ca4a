import json
import os

import numpy as np
import pytest
from PIL import Image

from gfss_hf.data.folder import FolderSegmentation, folder_class_index, folder_split, read_folder_classes
from gfss_hf.data.pascal import Pascal5i

NAMES = ["teapot", "lamp", "mug", "kettle"]


def make_folder(root, num=6, size=(40, 32), classes=None):
    """A small dataset: image i holds class (i % 4) + 1 in a block and class ((i + 1) % 4) + 1 in another."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(num):
        image = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        label = np.zeros((size[1], size[0]), dtype=np.uint8)
        label[2:18, 2:20] = i % 4 + 1
        label[20:30, 22:38] = (i + 1) % 4 + 1
        label[0, :] = 255
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(image).save(root / "images" / f"img{i}.{ext}", quality=95)
        Image.fromarray(label, "L").save(root / "masks" / f"img{i}.png")
    (root / "classes.json").write_text(json.dumps(classes or {"names": NAMES, "folds": [["teapot"], [3, "kettle"]]}))
    return root


def no_half_written_cache(cache):
    return not list(cache.rglob("dataset_info.json")) and not [p for p in cache.rglob("*") if "incomplete" in p.name]


def test_folder_round_trip_with_custom_classes(tmp_path):
    root = make_folder(tmp_path / "mine")
    split = folder_split(root, 1)
    assert split.class_names == tuple(NAMES) and split.novel_names == ("mug", "kettle") and split.dataset == "mine"
    builder = FolderSegmentation(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(root),
        fold=1,
        view="val",
        index_cache_dir=str(tmp_path / "index"),
    )
    builder.download_and_prepare()
    ds = builder.as_dataset(split="validation")
    assert ds["id"] == [f"img{i}" for i in range(6)]
    for ex in ds:
        i = int(ex["id"][3:])
        ext = "png" if i % 2 else "jpg"
        with Image.open(root / "images" / f"img{i}.{ext}") as im:
            assert np.array_equal(np.asarray(ex["image"]), np.asarray(im.convert("RGB")))
        with Image.open(root / "masks" / f"img{i}.png") as im:
            assert np.array_equal(np.asarray(ex["label"]), np.asarray(im))

    base = FolderSegmentation(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(root),
        fold=1,
        view="base_train",
        min_pixels=100,
        index_cache_dir=str(tmp_path / "index"),
    )
    base.download_and_prepare()
    train = base.as_dataset(split="train")
    for ex in train:
        assert set(np.unique(np.asarray(ex["label"])).tolist()) <= {0, 1, 2, 255}
    assert folder_class_index(root, min_pixels=200, cache_dir=tmp_path / "index")[1] == ["img0", "img4"]


def test_yaml_classes_with_num_folds_and_list_files(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "classes.json").unlink()
    (root / "classes.yaml").write_text("names: [teapot, lamp, mug, kettle]\nnum_folds: 2\ndataset: kitchen\n")
    (root / "val.txt").write_text("img1\nimg2\n")
    classes = read_folder_classes(root)
    assert classes.folds == ((1, 2), (3, 4)) and classes.dataset == "kitchen"
    builder = FolderSegmentation(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(root),
        fold=0,
        view="val",
        index_cache_dir=str(tmp_path / "index"),
    )
    builder.download_and_prepare()
    assert builder.as_dataset(split="validation")["id"] == ["img1", "img2"]


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*does not exist"):
        FolderSegmentation(cache_dir=str(tmp_path / "c"), data_dir=str(missing), view="val").download_and_prepare()
    with pytest.raises(FileNotFoundError, match=f"{missing}.*VOC2012"):
        Pascal5i(cache_dir=str(tmp_path / "c"), data_dir=str(missing), view="val").download_and_prepare()
    root = make_folder(tmp_path / "mine")
    for p in (root / "masks").iterdir():
        p.unlink()
    (root / "masks").rmdir()
    with pytest.raises(FileNotFoundError, match="masks.*does not exist; put the label PNGs"):
        FolderSegmentation(cache_dir=str(tmp_path / "c"), data_dir=str(root), view="val").download_and_prepare()
    assert no_half_written_cache(tmp_path / "c")


def test_list_naming_a_missing_file(tmp_path, sample_data):
    voc = sample_data / "pascal" / "VOCdevkit" / "VOC2012"
    bad_list = tmp_path / "list.txt"
    bad_list.write_text("2011_000003\n2011_999999\n")
    cache = tmp_path / "cache"
    builder = Pascal5i(cache_dir=str(cache), data_dir=str(voc), fold=0, view="val", val_list=str(bad_list))
    with pytest.raises(FileNotFoundError, match=r"2011_999999\.(jpg|png).*give a list"):
        builder.download_and_prepare()
    assert no_half_written_cache(cache)


def test_folder_list_naming_a_missing_mask_and_a_mask_without_image(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "val.txt").write_text("img0\nimg9\n")
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"img9\.png.*add them or remove"):
        FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val").download_and_prepare()
    (root / "val.txt").unlink()
    (root / "images" / "img2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"img2\.png.*has no image.*add the image or remove the mask"):
        FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val").download_and_prepare()
    assert no_half_written_cache(cache)


def test_unreadable_image_leaves_no_cache(tmp_path):
    root = make_folder(tmp_path / "mine")
    (root / "images" / "img3.png").write_bytes(b"this is not a png")
    cache = tmp_path / "cache"
    builder = FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val", index_cache_dir=str(tmp_path))
    with pytest.raises(Exception, match=r"img3\.png.*cannot be read.*replace or remove"):
        builder.download_and_prepare()
    assert no_half_written_cache(cache)
    # after the fix, the same builder config prepares normally
    Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(root / "images" / "img3.png")
    builder = FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val", index_cache_dir=str(tmp_path))
    builder.download_and_prepare()
    assert len(builder.as_dataset(split="validation")) == 6


def test_mask_values_outside_the_classes(tmp_path):
    root = make_folder(tmp_path / "mine")
    label = np.zeros((32, 40), dtype=np.uint8)
    label[5:10, 5:10] = 7
    Image.fromarray(label, "L").save(root / "masks" / "img4.png")
    cache = tmp_path / "cache"
    builder = FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val", index_cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"img4\.png.*values \[7\].*declares 4 classes.*add the missing class"):
        builder.download_and_prepare()
    assert no_half_written_cache(cache)
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_class_files(tmp_path):
    root = make_folder(tmp_path / "a", classes={"names": NAMES, "folds": [["teapot", "sofa"]]})
    with pytest.raises(ValueError, match="'sofa', which is not in 'names'"):
        read_folder_classes(root)
    root = make_folder(tmp_path / "b", classes={"names": NAMES})
    with pytest.raises(ValueError, match="exactly one of 'folds'"):
        read_folder_classes(root)
    with pytest.raises(ValueError, match=r"fold=3.*\[0, 1\]"):
        folder_split(make_folder(tmp_path / "c"), 3)


def _val_labels(root, cache, prepare=None):
    builder = FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val")
    builder.download_and_prepare(**(prepare or {}))
    ds = builder.as_dataset(split="validation")
    return {ex["id"]: np.asarray(ex["label"]) for ex in ds}


def _later(path, seconds=5):
    """Move the file's mtime forward: an edit made a few seconds after the previous build (file systems with a
    coarse clock could otherwise give the edited file its old mtime within one test)."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.mark.parametrize("change", ["edit_mask", "replace_image", "add_image", "remove_image"])
def test_changed_files_are_rebuilt_not_served_from_the_old_cache(tmp_path, change):
    root = make_folder(tmp_path / "mine")
    cache = tmp_path / "cache"
    before = _val_labels(root, cache)
    assert len(before) == 6
    if change == "edit_mask":
        label = before["img3"].copy()
        label[2:18, 2:20] = 1  # was 4
        Image.fromarray(label, "L").save(root / "masks" / "img3.png")
        _later(root / "masks" / "img3.png")
        assert np.array_equal(_val_labels(root, cache)["img3"], label)
    elif change == "replace_image":
        (root / "images" / "img2.jpg").unlink()
        Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(root / "images" / "img2.png")
        builder = FolderSegmentation(cache_dir=str(cache), data_dir=str(root), view="val")
        builder.download_and_prepare()
        image = builder.as_dataset(split="validation").filter(lambda ex: ex["id"] == "img2")[0]["image"]
        assert not np.asarray(image).any()
    elif change == "add_image":
        Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(root / "images" / "img9.png")
        Image.fromarray(np.ones((32, 40), dtype=np.uint8), "L").save(root / "masks" / "img9.png")
        assert sorted(_val_labels(root, cache)) == sorted([*before, "img9"])
    else:
        (root / "images" / "img5.png").unlink()
        (root / "masks" / "img5.png").unlink()
        assert sorted(_val_labels(root, cache)) == [f"img{i}" for i in range(5)]


def test_force_rebuild_sees_an_edit_that_kept_size_and_mtime(tmp_path):
    root = make_folder(tmp_path / "mine")
    cache = tmp_path / "cache"
    mask = root / "masks" / "img1.png"
    label = np.asarray(Image.open(mask)).copy()
    Image.fromarray(label, "L").save(mask, compress_level=0)  # uncompressed: an edit keeps the file size
    _val_labels(root, cache)
    st = os.stat(mask)
    label[label == 2] = 3
    Image.fromarray(label, "L").save(mask, compress_level=0)
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(mask).st_size == st.st_size
    on_disk = np.asarray(Image.open(mask))
    assert not np.array_equal(_val_labels(root, cache)["img1"], on_disk)  # the documented limit of the fingerprint
    rebuilt = _val_labels(root, cache, prepare={"download_mode": "force_redownload"})
    assert np.array_equal(rebuilt["img1"], on_disk)


def test_two_images_with_one_stem_are_refused(tmp_path):
    root = make_folder(tmp_path / "mine")
    Image.fromarray(np.zeros((32, 40, 3), dtype=np.uint8)).save(root / "images" / "img2.png")  # img2.jpg exists
    with pytest.raises(ValueError, match=r"match more than one image.*img2\.jpg.*img2\.png.*keep one image per id"):
        FolderSegmentation(cache_dir=str(tmp_path / "c"), data_dir=str(root), view="val").download_and_prepare()


def test_base_view_with_no_qualifying_image_says_which_threshold_and_classes(tmp_path):
    root = make_folder(tmp_path / "mine")
    builder = FolderSegmentation(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(root),
        fold=1,
        view="base_train",
        min_pixels=10_000,
        index_cache_dir=str(tmp_path / "index"),
    )
    with pytest.raises(ValueError, match=r"teapot, lamp\) covering >= 10000 px.*lower min_pixels"):
        builder.download_and_prepare()
