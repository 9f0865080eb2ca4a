import numpy as np
import pytest

from gfss_hf.data.splits import (
    COCO_CLASSES,
    SYNTHETIC_CLASSES,
    SYNTHETIC_SHAPES,
    SYNTHETIC_TEXTURES,
    VOC_CLASSES,
    FoldSplit,
    get_split,
)

ALL_FOLDS = [("pascal5i", f, None) for f in range(4)] + [("pascal10i", f, None) for f in range(2)]
ALL_FOLDS += [("coco20i", f, k) for f in range(4) for k in ("interleaved", "consecutive")]
ALL_FOLDS += [("synthetic", f, None) for f in range(4)]


@pytest.mark.parametrize("dataset,fold,kind", ALL_FOLDS)
def test_every_fold_partitions_the_classes(dataset, fold, kind):
    split = get_split(dataset, fold, kind)
    n = len(split.class_names)
    assert sorted(split.base_ids + split.novel_ids) == list(range(1, n + 1))
    assert not set(split.base_ids) & set(split.novel_ids)
    assert list(split.novel_ids) == sorted(split.novel_ids)
    assert len(split.base_names) == len(split.base_ids)


@pytest.mark.parametrize("dataset,num_folds", [("pascal5i", 4), ("pascal10i", 2), ("coco20i", 4), ("synthetic", 4)])
def test_novel_sets_of_all_folds_partition_the_classes(dataset, num_folds):
    novel = [c for f in range(num_folds) for c in get_split(dataset, f).novel_ids]
    assert sorted(novel) == list(range(1, len(get_split(dataset, 0).class_names) + 1))


def test_tables_match_the_method_notes():
    assert len(VOC_CLASSES) == 20 and len(COCO_CLASSES) == 80
    assert get_split("pascal5i", 0).novel_names == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert get_split("pascal5i", 1).novel_names == ("bus", "car", "cat", "chair", "cow")
    assert get_split("pascal5i", 2).novel_names == ("diningtable", "dog", "horse", "motorbike", "person")
    assert get_split("pascal5i", 3).novel_names == ("pottedplant", "sheep", "sofa", "train", "tvmonitor")
    assert get_split("pascal5i", 2).novel_ids == (11, 12, 13, 14, 15)
    assert get_split("pascal10i", 0).novel_ids == tuple(range(1, 11))
    assert get_split("pascal10i", 1).novel_ids == tuple(range(11, 21))
    assert get_split("coco20i", 0).novel_ids == (
        1,
        5,
        9,
        13,
        17,
        21,
        25,
        29,
        33,
        37,
        41,
        45,
        49,
        53,
        57,
        61,
        65,
        69,
        73,
        77,
    )
    assert get_split("coco20i", 3).novel_ids == tuple(range(4, 81, 4))
    assert get_split("coco20i", 1, "consecutive").novel_ids == tuple(range(21, 41))
    assert get_split("coco20i", 0).split_kind == "interleaved"
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush" and COCO_CLASSES[61] == "toilet"
    assert get_split("coco20i", 0).novel_names[:3] == ("person", "airplane", "boat")


def test_synthetic_folds_are_new_combinations_of_seen_shapes_and_textures():
    assert len(SYNTHETIC_CLASSES) == 20 and SYNTHETIC_CLASSES[0] == "circle-plain"
    for fold in range(4):
        split = get_split("synthetic", fold)
        base_shapes = {n.split("-")[0] for n in split.base_names}
        base_textures = {n.split("-")[1] for n in split.base_names}
        assert base_shapes == set(SYNTHETIC_SHAPES) and base_textures == set(SYNTHETIC_TEXTURES)
        assert len({n.split("-")[0] for n in split.novel_names}) == 5  # one novel class per shape


def test_remapping():
    split = get_split("pascal5i", 1)  # novel 6..10
    label = np.array([[0, 1, 5, 6, 10, 11, 20, 255]], dtype=np.uint8)
    assert split.to_base_training(label).tolist() == [[0, 1, 5, 255, 255, 6, 15, 255]]
    assert split.to_base_training(label, novel_to_background=True).tolist() == [[0, 1, 5, 0, 0, 6, 15, 255]]
    assert split.to_gfss_labels(label).tolist() == [[0, 1, 5, 16, 20, 6, 15, 255]]
    assert split.to_gfss_labels(label.astype(np.int64)).dtype == np.uint8
    id2label = split.gfss_id2label()
    assert id2label[0] == "background" and id2label[16] == "bus" and id2label[15] == "tvmonitor"
    assert len(split.base_id2label()) == 16


def test_remapping_rejects_values_outside_the_classes():
    split = get_split("pascal5i", 0)
    with pytest.raises(ValueError, match=r"\[21, 200\]"):
        split.to_base_training(np.array([[0, 21, 200]], dtype=np.uint8))
    with pytest.raises(ValueError, match="range"):
        split.to_gfss_labels(np.array([[300]]))


def test_custom_split_and_bad_inputs():
    split = FoldSplit.from_novel_ids("mine", 0, ["cat", "dog", "car"], [2])
    assert split.base_ids == (1, 3) and split.novel_names == ("dog",)
    with pytest.raises(ValueError, match="partition"):
        FoldSplit("mine", 0, "custom", ("a", "b"), (1,), (1,))
    with pytest.raises(ValueError, match="'imagenet'.*pascal5i"):
        get_split("imagenet", 0)
    with pytest.raises(ValueError, match=r"fold=4.*\[0, 1, 2, 3\]"):
        get_split("pascal5i", 4)
    with pytest.raises(ValueError, match=r"fold=2.*\[0, 1\]"):
        get_split("pascal10i", 2)
    with pytest.raises(ValueError, match="'diagonal'"):
        get_split("coco20i", 0, "diagonal")
