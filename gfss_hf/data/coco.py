"""COCO-20i: a `datasets` builder over a local COCO 2014 or 2017 tree.

Expected layout (`data_dir`):

```
annotations/instances_train2014.json   (or *2017.json)
annotations/instances_val2014.json
train2014/<file_name>   val2014/<file_name>
```

Semantic masks follow the convention of the few-shot literature (RePRI's mask creation): for each image, the
non-crowd annotations are painted in annotation order (a later instance overwrites an earlier one), each with its
category mapped to 1..80 by the rank of its `category_id`; background 0. Optionally, crowd regions that are still
background become 255 (ignore). Masks are computed once with pycocotools and cached as PNGs (each written
atomically), together with the per-image class pixel counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from .._io import atomic_write_bytes, atomic_write_json
from ._builder import (
    GFSSBuilderConfig,
    GFSSBuilderMixin,
    ListSource,
    default_index_cache_dir,
    read_list_file,
    read_mask,
)
from .episodes import class_index_from_pixel_counts, compute_pixel_counts
from .pascal import standard_list_path
from .splits import COCO_CLASSES, IGNORE_INDEX, FoldSplit, get_split

logger = logging.get_logger(__name__)

__all__ = [
    "semantic_mask",
    "CocoSemanticMasks",
    "standard_list_matches",
    "coco_pixel_counts",
    "coco_class_index",
    "Coco20iConfig",
    "Coco20i",
]

_SPLITS = ("train", "val")


def _find_annotation_file(root: Path, split: str, year: int | None) -> tuple[Path, int]:
    years = (year,) if year else (2014, 2017)
    for y in years:
        path = root / "annotations" / f"instances_{split}{y}.json"
        if path.is_file():
            return path, y
    looked = [str(root / "annotations" / f"instances_{split}{y}.json") for y in years]
    raise FileNotFoundError(
        f"no COCO annotation file for split {split!r} (looked for {looked}); point data_dir at the COCO folder that "
        "holds annotations/instances_<split><year>.json, or set `year`."
    )


def semantic_mask(coco, image_info: dict, category_to_id: dict[int, int], crowd_to_ignore: bool = False) -> np.ndarray:
    """
    The semantic mask of one image of a COCO instance annotation file (any year, any category set).

    Non-crowd annotations are painted in annotation order, so a later instance overwrites an earlier one; pixels
    of no annotation are background 0.

    Args:
        coco (`pycocotools.coco.COCO`): the loaded annotation file.
        image_info (`dict`): the image's entry of `coco.dataset["images"]` (`id`, `height`, `width`).
        category_to_id (`dict[int, int]`): COCO `category_id` -> label value (1..254); a category missing from it
            is not painted (its pixels stay what earlier annotations made them).
        crowd_to_ignore (`bool`, *optional*, defaults to `False`): crowd regions still background -> 255.

    Returns:
        `np.ndarray` of shape `(height, width)`, uint8.
    """
    label = np.zeros((image_info["height"], image_info["width"]), dtype=np.uint8)
    crowd = np.zeros_like(label, dtype=bool)
    for ann in coco.imgToAnns.get(image_info["id"], []):
        m = coco.annToMask(ann).astype(bool)
        if ann.get("iscrowd", 0):
            crowd |= m
        elif ann["category_id"] in category_to_id:
            label[m] = category_to_id[ann["category_id"]]
    if crowd_to_ignore:
        label[crowd & (label == 0)] = IGNORE_INDEX
    return label


class CocoSemanticMasks:
    """Semantic masks (ids 1..80) of one COCO annotation file, built with pycocotools and cached as PNGs.

    Args:
        data_dir (`str` or `os.PathLike`): the COCO folder (with `annotations/` and `<split><year>/`).
        split (`str`, *optional*, defaults to `"val"`): `"train"` or `"val"`.
        year (`int`, *optional*): 2014 or 2017; `None` takes whichever annotation file exists (2014 first).
        crowd_to_ignore (`bool`, *optional*, defaults to `False`): crowd regions still background -> 255.
        cache_dir (`str` or `os.PathLike`, *optional*): mask cache root (default
            `$HF_DATASETS_CACHE/gfss_hf_index`); masks go to `<cache_dir>/coco_masks/<key>/<image stem>.png`.

    Example:

    ```python
    >>> masks = CocoSemanticMasks("/data/coco", "val")
    >>> label = masks.mask(masks.image_ids()[0])  # uint8 (H, W), 0..80
    ```
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "val",
        year: int | None = None,
        crowd_to_ignore: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f"split={split!r} is not a COCO split here; use one of {list(_SPLITS)}.")
        root = Path(data_dir).expanduser() if data_dir is not None else None
        if root is None or not root.is_dir():
            raise FileNotFoundError(
                f"COCO data folder {str(root)!r} does not exist; pass the folder holding annotations/ and "
                f"{split}<year>/."
            )
        self.root = root
        self.split = split
        self.ann_file, self.year = _find_annotation_file(root, split, year)
        self.image_dir = root / f"{split}{self.year}"
        self.crowd_to_ignore = crowd_to_ignore
        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            self.coco = COCO(str(self.ann_file))
        cat_ids = sorted(self.coco.cats)
        if len(cat_ids) != len(COCO_CLASSES):
            raise ValueError(
                f"{str(self.ann_file)!r} has {len(cat_ids)} categories, expected the 80 COCO categories; use the "
                "instances_*.json files of COCO 2014/2017."
            )
        self.category_to_id = {cat: rank + 1 for rank, cat in enumerate(cat_ids)}
        self._by_stem = {Path(img["file_name"]).stem: img for img in self.coco.dataset["images"]}
        stat = self.ann_file.stat()
        key = f"{self.ann_file.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|crowd={int(crowd_to_ignore)}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        base = Path(cache_dir) if cache_dir is not None else default_index_cache_dir()
        self.mask_dir = base / "coco_masks" / f"{split}{self.year}-{digest}"

    def image_ids(self) -> list[str]:
        """Ids (file-name stems) of all images of the annotation file, in file order."""
        return list(self._by_stem)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / self._info(image_id)["file_name"]

    def _info(self, image_id: str) -> dict:
        try:
            return self._by_stem[image_id]
        except KeyError:
            raise KeyError(
                f"image {image_id!r} is not in {str(self.ann_file)!r}; check the list file against the annotation "
                "file (COCO 2014 lists name COCO_<split>2014_<id>.jpg)."
            ) from None

    def build_mask(self, image_id: str) -> np.ndarray:
        """Compute the semantic mask of `image_id` (no cache)."""
        return semantic_mask(self.coco, self._info(image_id), self.category_to_id, self.crowd_to_ignore)

    def mask_path(self, image_id: str) -> Path:
        return self.mask_dir / f"{image_id}.png"

    def mask(self, image_id: str) -> np.ndarray:
        """The cached mask of `image_id` (built and written atomically on first use)."""
        path = self.mask_path(image_id)
        if path.is_file():
            return read_mask(path)
        label = self.build_mask(image_id)
        buf = io.BytesIO()
        Image.fromarray(label, "L").save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        return label

    def pixel_counts(self, image_ids: list[str] | None = None) -> dict[str, dict[int, int]]:
        """Per image id, the pixel count of every class present (cached as JSON next to the masks)."""
        ids = self.image_ids() if image_ids is None else list(image_ids)
        path = self.mask_dir / "pixel_counts.json"
        cached: dict[str, dict[int, int]] = {}
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
                cached = {i: {int(c): int(n) for c, n in v.items()} for i, v in raw.items()}
            except ValueError as err:
                logger.warning(f"ignoring the unreadable index cache {path} ({err}); recomputing it")
        todo = [i for i in ids if i not in cached]
        if todo:
            cached.update(compute_pixel_counts((i, self.mask(i)) for i in todo))
            atomic_write_json(path, {i: {str(c): n for c, n in v.items()} for i, v in cached.items()})
        return {i: cached[i] for i in ids}


def _list_image_ids(masks: CocoSemanticMasks, list_file: str | os.PathLike | None) -> list[str]:
    if list_file is None:
        return masks.image_ids()
    if str(list_file) == "standard":
        list_file = standard_list_path("coco", masks.split)
    ids = [Path(img).stem for img, _ in read_list_file(list_file)]
    for image_id in ids:
        masks._info(image_id)  # raises naming the id and the annotation file
    return ids


def standard_list_matches(masks: CocoSemanticMasks) -> bool:
    """Whether the annotation file of `masks` holds every image of the shipped standard list of its split (the
    COCO-20i lists name COCO 2014 files; a 2017 file, or a subset, does not)."""
    try:
        path = standard_list_path("coco", masks.split)
    except (FileNotFoundError, ValueError):
        return False
    known = set(masks.image_ids())
    return all(Path(img).stem in known for img, _ in read_list_file(path))


def coco_pixel_counts(
    data_dir: str | os.PathLike,
    split: str = "val",
    year: int | None = None,
    list_file: str | os.PathLike | None = None,
    crowd_to_ignore: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[int, int]]:
    """Per image id, the pixel count of every class present (builds and caches the masks once).

    Args:
        data_dir (`str` or `os.PathLike`): the COCO folder.
        split (`str`, *optional*, defaults to `"val"`): `"train"` or `"val"`.
        year (`int`, *optional*): 2014 or 2017 (default: whichever exists).
        list_file (`str`, *optional*): a list of `image mask` lines restricting the images; `"standard"` uses the
            shipped COCO-20i val list (COCO 2014 file names); `None` takes every image of the annotation file.
        crowd_to_ignore (`bool`, *optional*, defaults to `False`): see [`CocoSemanticMasks`].
        cache_dir (`str` or `os.PathLike`, *optional*): cache root.
    """
    masks = CocoSemanticMasks(data_dir, split, year, crowd_to_ignore, cache_dir)
    return masks.pixel_counts(_list_image_ids(masks, list_file))


def coco_class_index(
    data_dir: str | os.PathLike,
    split: str = "val",
    min_pixels: int = 2048,
    year: int | None = None,
    list_file: str | os.PathLike | None = None,
    crowd_to_ignore: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[int, list[str]]:
    """Class id (1..80) -> sorted image ids where the class covers >= `min_pixels` pixels."""
    counts = coco_pixel_counts(data_dir, split, year, list_file, crowd_to_ignore, cache_dir)
    return class_index_from_pixel_counts(counts, min_pixels, class_ids=range(1, len(COCO_CLASSES) + 1))


@dataclass
class Coco20iConfig(GFSSBuilderConfig):
    """Configuration of [`Coco20i`] (fields of [`GFSSBuilderConfig`] plus the ones below).

    Args:
        split_kind (`str`, defaults to `"interleaved"`): COCO-20i fold table, `"interleaved"` or `"consecutive"`.
        year (`int`, *optional*): 2014 or 2017 (default: whichever annotation file exists, 2014 first).
        train_list (`str`, *optional*): list restricting the train images (`None`: all images of the JSON).
        val_list (`str`, *optional*): list restricting the val images (`"standard"`: the shipped 40,137-line list;
            `None`: all images of the JSON).
        crowd_to_ignore (`bool`, defaults to `False`): crowd regions still background -> 255.
        index_cache_dir (`str`, *optional*): root of the mask / pixel-count cache.
    """

    split_kind: str = "interleaved"
    year: int | None = None
    train_list: str | None = None
    val_list: str | None = None
    crowd_to_ignore: bool = False
    index_cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        get_split("coco20i", self.fold, self.split_kind)  # validates fold and split_kind
        if self.year not in (None, 2014, 2017):
            raise ValueError(f"year={self.year!r} is not a COCO release here; use 2014, 2017 or None.")


class Coco20i(GFSSBuilderMixin, datasets.GeneratorBasedBuilder):
    """COCO-20i builder: `{"id": str, "image": PIL RGB, "label": PIL "L"}` examples, self-contained cache.

    Example:

    ```python
    >>> builder = Coco20i(cache_dir="/tmp/cache", data_dir="/data/coco", fold=0, view="val")
    >>> builder.download_and_prepare()
    >>> val = builder.as_dataset(split="validation")
    ```
    """

    BUILDER_CONFIG_CLASS = Coco20iConfig
    VERSION = datasets.Version("1.0.0")
    DESCRIPTION = "COCO-20i for GFSS"

    @property
    def fold_split(self) -> FoldSplit:
        return get_split("coco20i", self.config.fold, self.config.split_kind)

    def _list_source(self, split: str) -> ListSource:
        cfg = self.config
        masks = CocoSemanticMasks(cfg.data_dir, split, cfg.year, cfg.crowd_to_ignore, cfg.index_cache_dir)
        ids = _list_image_ids(masks, self._list_file(split))
        missing = [str(masks.image_path(i)) for i in ids if not masks.image_path(i).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {str(masks.ann_file)!r} are missing, e.g. {missing[:3]}; give a list "
                "file of the images you have or complete the image folder."
            )
        # Masks are built from the annotation file (and cached) by image id: the label handle is the id.
        return ListSource(
            entries=[(i, masks.image_path(i), i) for i in ids],
            read_label=masks.mask,
            pixel_counts=lambda: masks.pixel_counts(ids),
        )
