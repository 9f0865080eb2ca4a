"""Fold tables of the GFSS benchmarks and the label remapping that goes with them.

Dataset ids: background is 0, the object classes of a dataset are 1..N in the dataset's own order, 255 is the
ignore label. A fold divides 1..N into base classes (seen during pre-training) and novel classes (held out).

Two label spaces derive from a fold:

- base training: background 0, base class c -> its rank in the sorted base list + 1, novel -> 255 (ignored);
- GFSS classifier rows: [background, base_1..base_B, novel_1..novel_N] (base c -> rank + 1, novel c ->
  B + 1 + rank in the novel list).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "COCO_CLASSES",
    "SYNTHETIC_SHAPES",
    "SYNTHETIC_TEXTURES",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_IMAGE_SIZE",
    "SYNTHETIC_MIN_PIXELS",
    "CAMVID_CLASSES",
    "CAMVID_VOID",
    "CAMVID_FOLDS",
    "SPLIT_DATASETS",
    "FoldSplit",
    "get_split",
    "pascal5i_novel_ids",
    "pascal10i_novel_ids",
    "coco20i_novel_ids",
    "synthetic_novel_ids",
    "camvid_novel_ids",
]

IGNORE_INDEX = 255

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

# The 80 COCO categories in category-id order (ids 1..90 with gaps, ranked to 1..80).
COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

# The procedural dataset: a class is a (shape, texture) pair, id = shape_index * 4 + texture_index + 1.
SYNTHETIC_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
SYNTHETIC_TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")
SYNTHETIC_CLASSES: tuple[str, ...] = tuple(f"{s}-{t}" for s in SYNTHETIC_SHAPES for t in SYNTHETIC_TEXTURES)
# Its default image side, and its base-training area threshold at that side: 2,048 px at 473x473 is 0.9 % of the
# canvas; the same share of a 96x96 image is ~84 px. 64 px keeps every object that is at least half visible (the
# smallest object covers ~250 px). Here, beside its class table, so that the samplers' thresholds and the renderer
# read the same numbers without importing each other.
SYNTHETIC_IMAGE_SIZE = 96
SYNTHETIC_MIN_PIXELS = 64

# CamVid in the SegNet tutorial's 11-class version: label value k is CAMVID_CLASSES[k] (dataset id k + 1, as CamVid
# has no background class), CAMVID_VOID is unlabelled (-> ignore).
CAMVID_CLASSES: tuple[str, ...] = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_VOID = 11
# Novel classes (names) of the CamVid folds, derived from the train split's statistics
# (`gfss_hf.data.camvid.camvid_class_statistics`, 367 images; "share" = share of the labelled pixels, "images" = train
# images holding the class on >= 1,582 px, the paper protocol's threshold at 480x360):
#
#   class       share   images      class       share   images
#   Road        32.96 %   367       Car          6.11 %   292
#   Building    24.21 %   352       Pavement     4.67 %   306
#   Sky         17.54 %   364       SignSymbol   1.22 %   157
#   Tree        10.12 %   309       Fence        1.17 %   101
#   Pole         1.02 %   158       Pedestrian   0.67 %    82
#   Bicyclist    0.30 %    40
#
# Fold 1 ("thin / small") holds the three classes of smallest pixel share: Bicyclist, Pedestrian, Pole. Fold 0
# ("large objects") holds, among the remaining object classes (Sky, Building, Road and Pavement are the scene's layout
# surfaces, kept base so that pre-training learns the street frame), the three present at the threshold in the most
# images: Tree (309), Car (292), SignSymbol (157; Fence has 101).
CAMVID_FOLDS: tuple[tuple[str, ...], ...] = (("Tree", "SignSymbol", "Car"), ("Pole", "Pedestrian", "Bicyclist"))

_SPLIT_KINDS: dict[str, tuple[str, ...]] = {
    "pascal5i": ("default",),
    "pascal10i": ("default",),
    "coco20i": ("interleaved", "consecutive"),
    "synthetic": ("default",),
    "camvid": ("default",),
}
_NUM_FOLDS: dict[str, int] = {"pascal5i": 4, "pascal10i": 2, "coco20i": 4, "synthetic": 4, "camvid": len(CAMVID_FOLDS)}
SPLIT_DATASETS: tuple[str, ...] = tuple(_SPLIT_KINDS)


def pascal5i_novel_ids(fold: int) -> tuple[int, ...]:
    """Novel dataset ids of PASCAL-5i fold `fold` (0-3): 5 * fold + 1 .. 5 * fold + 5."""
    _check_fold("pascal5i", fold)
    return tuple(range(5 * fold + 1, 5 * fold + 6))


def pascal10i_novel_ids(fold: int) -> tuple[int, ...]:
    """Novel dataset ids of PASCAL-10i fold `fold` (0-1): 1..10 or 11..20."""
    _check_fold("pascal10i", fold)
    return tuple(range(10 * fold + 1, 10 * fold + 11))


def coco20i_novel_ids(fold: int, split_kind: str = "interleaved") -> tuple[int, ...]:
    """Novel dataset ids (1..80) of COCO-20i fold `fold` (0-3).

    Args:
        fold (`int`): 0-3.
        split_kind (`str`, *optional*, defaults to `"interleaved"`): `"interleaved"` gives
            {fold + 1, fold + 5, ..., fold + 77}; `"consecutive"` gives 20 * fold + 1 .. 20 * fold + 20.
    """
    _check_fold("coco20i", fold)
    _check_kind("coco20i", split_kind)
    if split_kind == "interleaved":
        return tuple(range(fold + 1, 81, 4))
    return tuple(range(20 * fold + 1, 20 * fold + 21))


def synthetic_novel_ids(fold: int) -> tuple[int, ...]:
    """Novel ids of the procedural dataset's fold `fold` (0-3).

    Fold f holds one class per shape, shape s with texture (s + f) mod 4, so every novel class is a new pairing of
    a shape and a texture that both appear among the base classes of that fold; the four folds partition the 20
    classes.
    """
    _check_fold("synthetic", fold)
    n_tex = len(SYNTHETIC_TEXTURES)
    return tuple(sorted(s * n_tex + (s + fold) % n_tex + 1 for s in range(len(SYNTHETIC_SHAPES))))


def camvid_novel_ids(fold: int) -> tuple[int, ...]:
    """Novel dataset ids (1..11) of CamVid fold `fold`: 0 = large objects (Tree, SignSymbol, Car), 1 = thin / small
    objects (Pole, Pedestrian, Bicyclist); see [`CAMVID_FOLDS`] for the statistics behind them."""
    _check_fold("camvid", fold)
    return tuple(sorted(CAMVID_CLASSES.index(name) + 1 for name in CAMVID_FOLDS[fold]))


def _check_fold(dataset: str, fold: int) -> None:
    num_folds = _NUM_FOLDS[dataset]
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < num_folds:
        raise ValueError(
            f"fold={fold!r} is not a fold of {dataset!r}; it has folds {list(range(num_folds))}. Pass one of them."
        )


def _check_kind(dataset: str, split_kind: str) -> None:
    if split_kind not in _SPLIT_KINDS[dataset]:
        raise ValueError(
            f"split_kind={split_kind!r} is not known for {dataset!r}; allowed: {list(_SPLIT_KINDS[dataset])}."
        )


@dataclass(frozen=True)
class FoldSplit:
    """One fold of a GFSS benchmark: which classes are base and which are novel, and the label remappings.

    Construct it directly to describe a custom dataset (the folder builder does this); `get_split` returns the
    standard ones.

    Args:
        dataset (`str`): dataset name, e.g. `"pascal5i"`.
        fold (`int`): fold index.
        split_kind (`str`): which variant of the fold table (`"default"`, `"interleaved"`, `"consecutive"`, ...).
        class_names (`tuple[str, ...]`): object class names in dataset order, WITHOUT background;
            `class_names[i]` is dataset id `i + 1`.
        base_ids (`tuple[int, ...]`): sorted dataset ids of the base classes.
        novel_ids (`tuple[int, ...]`): sorted dataset ids of the novel classes. Base and novel partition
            `1..len(class_names)`.

    Example:

    ```python
    >>> split = get_split("pascal5i", 0)
    >>> split.novel_names
    ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle')
    >>> split.to_base_training(np.array([[0, 1, 6, 255]], dtype=np.uint8)).tolist()
    [[0, 255, 1, 255]]
    ```
    """

    dataset: str
    fold: int
    split_kind: str
    class_names: tuple[str, ...]
    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]

    def __post_init__(self):
        # Accept lists for convenience but store tuples so the dataclass stays hashable.
        object.__setattr__(self, "class_names", tuple(str(n) for n in self.class_names))
        object.__setattr__(self, "base_ids", tuple(int(i) for i in self.base_ids))
        object.__setattr__(self, "novel_ids", tuple(int(i) for i in self.novel_ids))
        n = len(self.class_names)
        if n == 0 or n >= IGNORE_INDEX:
            raise ValueError(
                f"FoldSplit needs 1..254 class names (background excluded), got {n}; labels are stored as uint8 "
                f"with {IGNORE_INDEX} reserved for 'ignore'."
            )
        if len(set(self.class_names)) != n:
            dupes = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise ValueError(f"class names must be unique; repeated: {dupes}. Rename them.")
        for field_name in ("base_ids", "novel_ids"):
            ids = getattr(self, field_name)
            if list(ids) != sorted(set(ids)):
                raise ValueError(f"{field_name}={list(ids)} must be sorted and without repeats; sort them.")
        all_ids = sorted(self.base_ids + self.novel_ids)
        if all_ids != list(range(1, n + 1)):
            raise ValueError(
                f"base_ids={list(self.base_ids)} and novel_ids={list(self.novel_ids)} must partition the dataset "
                f"ids 1..{n} (one per class name, background 0 excluded); fix the lists."
            )
        if not self.novel_ids:
            raise ValueError("novel_ids is empty; a fold needs at least one novel class.")

    # ------------------------------------------------------------------ names
    @property
    def num_classes(self) -> int:
        """Number of object classes (background excluded)."""
        return len(self.class_names)

    @property
    def base_names(self) -> tuple[str, ...]:
        """Names of the base classes, in `base_ids` order."""
        return tuple(self.class_names[i - 1] for i in self.base_ids)

    @property
    def novel_names(self) -> tuple[str, ...]:
        """Names of the novel classes, in `novel_ids` order."""
        return tuple(self.class_names[i - 1] for i in self.novel_ids)

    def base_id2label(self) -> dict[int, str]:
        """Rows of the pre-trained (B+1)-way classifier: `{0: "background", 1: base_1, ...}`."""
        return {0: "background", **{r + 1: name for r, name in enumerate(self.base_names)}}

    def gfss_id2label(self) -> dict[int, str]:
        """Rows of the expanded (B+1+N)-way classifier: background, base classes, then novel classes."""
        b = len(self.base_ids)
        return {**self.base_id2label(), **{b + 1 + r: name for r, name in enumerate(self.novel_names)}}

    # ------------------------------------------------------------- remapping
    def check_label(self, label: np.ndarray) -> np.ndarray:
        """Validate a dataset-id label map (integer, values 0..N or 255) and return it as `uint8`."""
        arr = np.asarray(label)
        if arr.dtype.kind not in "ui":
            raise ValueError(f"label must be an integer array, got dtype {arr.dtype}; pass the raw label map.")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > IGNORE_INDEX):
            raise ValueError(
                f"label values must lie in 0..{self.num_classes} or be {IGNORE_INDEX}, got range "
                f"[{int(arr.min())}, {int(arr.max())}] for {self.dataset!r}."
            )
        arr = arr.astype(np.uint8, copy=False)
        bad = (arr > self.num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            values = sorted(int(v) for v in np.unique(arr[bad]))
            raise ValueError(
                f"label has values {values} outside the classes of {self.dataset!r} (0..{self.num_classes} and "
                f"{IGNORE_INDEX}); check that the mask belongs to this dataset."
            )
        return arr

    def _lut(self, novel_value: int | None) -> np.ndarray:
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[0] = 0
        for rank, cid in enumerate(self.base_ids):
            lut[cid] = rank + 1
        b = len(self.base_ids)
        for rank, cid in enumerate(self.novel_ids):
            lut[cid] = b + 1 + rank if novel_value is None else novel_value
        return lut

    def to_base_training(self, label: np.ndarray, novel_to_background: bool = False) -> np.ndarray:
        """Map dataset ids to base-training labels.

        Args:
            label (`np.ndarray` of shape `(H, W)`, integer): dataset ids (0 background, 1..N, 255 ignore).
            novel_to_background (`bool`, *optional*, defaults to `False`): label novel pixels background (0)
                instead of ignore (255).

        Returns:
            `np.ndarray` of shape `(H, W)`, `uint8`: 0 background, base class -> rank in `base_ids` + 1, novel ->
            255 (or 0), 255 stays 255.
        """
        arr = self.check_label(label)
        return self._lut(0 if novel_to_background else IGNORE_INDEX)[arr]

    def to_gfss_labels(self, label: np.ndarray) -> np.ndarray:
        """Map dataset ids to the rows of the expanded classifier `[bg, base..., novel...]`.

        Args:
            label (`np.ndarray` of shape `(H, W)`, integer): dataset ids.

        Returns:
            `np.ndarray` of shape `(H, W)`, `uint8`: base c -> rank + 1, novel c -> B + 1 + rank in `novel_ids`,
            0 and 255 unchanged.
        """
        arr = self.check_label(label)
        return self._lut(None)[arr]

    @classmethod
    def from_novel_ids(
        cls, dataset: str, fold: int, class_names: Sequence[str], novel_ids: Sequence[int], split_kind: str = "custom"
    ) -> FoldSplit:
        """Build a split from the class names and the novel ids; every other class is base."""
        novel = tuple(sorted(int(i) for i in novel_ids))
        base = tuple(i for i in range(1, len(class_names) + 1) if i not in set(novel))
        return cls(dataset, int(fold), split_kind, tuple(class_names), base, novel)


def get_split(dataset: str, fold: int, split_kind: str | None = None) -> FoldSplit:
    """Return a standard fold.

    Args:
        dataset (`str`): one of `"pascal5i"`, `"pascal10i"`, `"coco20i"`, `"synthetic"`, `"camvid"`.
        fold (`int`): 0-3 (0-1 for `"pascal10i"` and `"camvid"`).
        split_kind (`str`, *optional*): `None` picks the default (`"interleaved"` for COCO-20i, `"default"`
            otherwise); COCO-20i also accepts `"consecutive"`.

    Returns:
        [`FoldSplit`]

    Example:

    ```python
    >>> get_split("coco20i", 0).novel_ids[:3]
    (1, 5, 9)
    ```
    """
    if dataset not in _SPLIT_KINDS:
        raise ValueError(
            f"dataset={dataset!r} has no built-in fold table; allowed: {list(SPLIT_DATASETS)}. For your own data "
            "construct `FoldSplit(...)` (or `FoldSplit.from_novel_ids`) directly."
        )
    kind = split_kind if split_kind is not None else _SPLIT_KINDS[dataset][0]
    _check_kind(dataset, kind)
    _check_fold(dataset, fold)
    fold = int(fold)
    if dataset == "pascal5i":
        names, novel = VOC_CLASSES, pascal5i_novel_ids(fold)
    elif dataset == "pascal10i":
        names, novel = VOC_CLASSES, pascal10i_novel_ids(fold)
    elif dataset == "coco20i":
        names, novel = COCO_CLASSES, coco20i_novel_ids(fold, kind)
    elif dataset == "camvid":
        names, novel = CAMVID_CLASSES, camvid_novel_ids(fold)
    else:
        names, novel = SYNTHETIC_CLASSES, synthetic_novel_ids(fold)
    return FoldSplit.from_novel_ids(dataset, fold, names, novel, split_kind=kind)
