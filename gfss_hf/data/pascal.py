"""PASCAL-5i / PASCAL-10i: a `datasets` builder over a local VOC2012 + SBD ("Aug") tree.

Expected layout (`data_dir` may point at the VOC2012 folder, at `VOCdevkit/`, or at their parent):

```
VOC2012/
  JPEGImages/<id>.jpg
  SegmentationClassAug/<id>.png     palette PNGs, values 0..20, 255 = ignore
```

The standard lists (PASCAL-5i train 5,953 / val 1,449 lines, from the RePRI repository, MIT) ship with the package
in `gfss_hf/data/lists/pascal/`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import datasets
from transformers.utils import logging

from ._builder import (
    GFSSBuilderConfig,
    GFSSBuilderMixin,
    ListSource,
    cached_pixel_counts,
    read_list_file,
    read_mask,
)
from .episodes import class_index_from_pixel_counts
from .splits import VOC_CLASSES, FoldSplit, get_split

logger = logging.get_logger(__name__)

__all__ = [
    "PASCAL_DATASETS",
    "standard_list_path",
    "resolve_voc_root",
    "read_pascal_list",
    "pascal_pixel_counts",
    "pascal_class_index",
    "Pascal5iConfig",
    "Pascal5i",
]

PASCAL_DATASETS = ("pascal5i", "pascal10i")
_LIST_SPLITS = ("train", "val")


def standard_list_path(dataset: str, split: str) -> Path:
    """Path of a list shipped with the package: `standard_list_path("pascal", "val")`, `("coco", "val")`."""
    path = Path(str(resources.files("gfss_hf.data").joinpath("lists", dataset, f"{split}.txt")))
    if not path.is_file():
        raise FileNotFoundError(
            f"no standard list {dataset}/{split}.txt in the package (looked at {str(path)!r}); pass a list file."
        )
    return path


def resolve_voc_root(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding `JPEGImages/` and `SegmentationClassAug/` under `data_dir`.

    Accepts the VOC2012 folder itself, `VOCdevkit/`, or a folder containing `VOCdevkit/`.
    """
    if data_dir is None:
        raise ValueError(
            "data_dir is None; pass the path of your VOC2012 folder (with JPEGImages/ and SegmentationClassAug/)."
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; pass the path of your VOC2012 folder (with JPEGImages/ and "
            "SegmentationClassAug/)."
        )
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "SegmentationClassAug").is_dir() or (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{str(root)!r} holds neither JPEGImages/ nor SegmentationClassAug/ (also looked in VOC2012/ and "
        "VOCdevkit/VOC2012/); point data_dir at the VOC2012 folder of VOC2012 + SBD (SegmentationClassAug)."
    )


def read_pascal_list(split: str = "val", list_file: str | os.PathLike | None = None) -> list[tuple[str, str, str]]:
    """(image id, image relpath, mask relpath) of a list (the shipped standard one when `list_file` is None)."""
    if list_file is None:
        if split not in _LIST_SPLITS:
            raise ValueError(f"split={split!r} has no standard list; use one of {list(_LIST_SPLITS)} or a list_file.")
        list_file = standard_list_path("pascal", split)
    return [(Path(img).stem, img, mask) for img, mask in read_list_file(list_file)]


def pascal_pixel_counts(
    data_dir: str | os.PathLike,
    split: str = "val",
    list_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[int, int]]:
    """Per image id of a list, the pixel count of every class present, from the masks only (no JPEG decoded).

    Cached as JSON (atomic write) under `cache_dir` (default `$HF_DATASETS_CACHE/gfss_hf_index`; `""` disables).

    Args:
        data_dir (`str` or `os.PathLike`): the VOC2012 folder (see `resolve_voc_root`).
        split (`str`, *optional*, defaults to `"val"`): which standard list when `list_file` is None.
        list_file (`str` or `os.PathLike`, *optional*): a custom list file.
        cache_dir (`str` or `os.PathLike`, *optional*): folder of the JSON cache.
    """
    root = resolve_voc_root(data_dir)
    entries = read_pascal_list(split, list_file)
    items = [(image_id, str(root / mask)) for image_id, _, mask in entries]
    return cached_pixel_counts("pascal", items, read_mask, cache_dir)


def pascal_class_index(
    data_dir: str | os.PathLike,
    split: str = "val",
    min_pixels: int = 2048,
    list_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[int, list[str]]:
    """Class id (1..20) -> sorted image ids of the list where the class covers >= `min_pixels` pixels.

    Example:

    ```python
    >>> index = pascal_class_index("/data/VOCdevkit/VOC2012", "val", min_pixels=2048)
    >>> len(index[1])  # aeroplane images of the val list
    ```
    """
    counts = pascal_pixel_counts(data_dir, split, list_file, cache_dir)
    return class_index_from_pixel_counts(counts, min_pixels, class_ids=range(1, len(VOC_CLASSES) + 1))


@dataclass
class Pascal5iConfig(GFSSBuilderConfig):
    """Configuration of [`Pascal5i`] (fields of [`GFSSBuilderConfig`] plus the ones below).

    Args:
        dataset (`str`, defaults to `"pascal5i"`): `"pascal5i"` or `"pascal10i"` (which fold table).
        train_list (`str`, *optional*): custom list of the train/base_train views (default: the shipped
            5,953-line list).
        val_list (`str`, *optional*): custom list of the val view (default: the shipped 1,449-line list).
        index_cache_dir (`str`, *optional*): where the per-class pixel counts are cached (see
            `pascal_pixel_counts`).
    """

    dataset: str = "pascal5i"
    train_list: str | None = None
    val_list: str | None = None
    index_cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.dataset not in PASCAL_DATASETS:
            raise ValueError(
                f"dataset={self.dataset!r} is not a PASCAL fold table; use one of {list(PASCAL_DATASETS)}."
            )
        get_split(self.dataset, self.fold)  # validates the fold


class Pascal5i(GFSSBuilderMixin, datasets.GeneratorBasedBuilder):
    """PASCAL-5i builder: `{"id": str, "image": PIL RGB, "label": PIL "L"}` examples, self-contained cache.

    The `"base_train"` view yields split `"train"` (labels 0..15 / 255), `"train"` yields split `"train"` and
    `"val"` yields split `"validation"` (dataset ids 0..20 / 255).

    Example:

    ```python
    >>> builder = Pascal5i(cache_dir="/tmp/cache", data_dir="/data/VOCdevkit/VOC2012", fold=0, view="val")
    >>> builder.download_and_prepare()
    >>> val = builder.as_dataset(split="validation")
    ```
    `Pascal5i.from_config(Pascal5iConfig(...), cache_dir=...)` takes a config instance.
    """

    BUILDER_CONFIG_CLASS = Pascal5iConfig
    VERSION = datasets.Version("1.0.0")
    DESCRIPTION = "PASCAL-5i (VOC2012 + SBD) for GFSS"

    @property
    def fold_split(self) -> FoldSplit:
        return get_split(self.config.dataset, self.config.fold)

    def _list_source(self, split: str) -> ListSource:
        cfg = self.config
        root = resolve_voc_root(cfg.data_dir)
        list_file = self._list_file(split)
        entries = read_pascal_list(split, list_file)
        missing = [root / p for _, img, mask in entries for p in (img, mask) if not (root / p).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} file(s) named by the {split} list are missing under {str(root)!r}, e.g. "
                f"{[str(p) for p in missing[:3]]}; give a list of the images you have (list file) or complete the "
                "data folder."
            )
        return ListSource(
            entries=[(image_id, root / img, root / mask) for image_id, img, mask in entries],
            read_label=read_mask,
            pixel_counts=lambda: pascal_pixel_counts(root, split, list_file, cfg.index_cache_dir),
        )
