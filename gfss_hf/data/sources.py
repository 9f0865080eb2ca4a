"""The dataset registry: a dataset name -> its fold table, on-disk layout check, builder and evaluation image source.

Pre-training (`gfss_hf.training`), evaluation (`scripts/evaluate.py`) and every list of allowed `--dataset` values
read this one table ([`DATA_SOURCES`], [`DATASET_NAMES`]); adding a dataset means adding one [`DataSource`] here.

- [`load_fold_split`]: the `FoldSplit` of a fold (a folder dataset reads its `classes.json`);
- [`check_data_dir`]: a clear error before any work when `data_dir` lacks the layout the dataset needs;
- [`build_view`]: the `"base_train"` / `"train"` / `"val"` view of a dataset on disk, as a `datasets.Dataset`;
- [`load_image_source`]: the images of one list by id, with their class pixel counts, for
  `gfss_hf.data.episodes.build_episodes` and `gfss_hf.evaluation.evaluate_episodes` ([`DatasetImageSource`]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from transformers.utils import logging

from .camvid import CamVid, camvid_entries, camvid_image_areas, camvid_pixel_counts, check_camvid_layout
from .coco import Coco20i, CocoSemanticMasks, coco_pixel_counts, standard_list_matches
from .episodes import compute_pixel_counts
from .folder import (
    FolderSegmentation,
    folder_entries,
    folder_image_areas,
    folder_pixel_counts,
    folder_split,
    read_folder_classes,
)
from .pascal import PASCAL_DATASETS, Pascal5i, pascal_pixel_counts, resolve_voc_root
from .splits import FoldSplit, get_split
from .synthetic import DEFAULT_IMAGE_SIZE, SyntheticSegmentation

logger = logging.get_logger(__name__)

__all__ = [
    "DATASET_NAMES",
    "DATA_SOURCES",
    "DataSource",
    "DatasetImageSource",
    "build_view",
    "check_data_dir",
    "get_data_source",
    "load_fold_split",
    "load_image_source",
]


# -- image sources --------------------------------------------------------------------------------------------------
class DatasetImageSource:
    """
    Image access by id over a `datasets.Dataset` with columns `id`, `image` and `label` (dataset ids, 255 ignored),
    as the PASCAL / COCO / folder builders of `gfss_hf.data` produce.

    Args:
        dataset (`datasets.Dataset`): the split.
        pixel_counts (`dict[str, dict[int, int]]`, *optional*): per image id, the pixel count of each class (e.g.
            `gfss_hf.data.pascal.pascal_pixel_counts`, computed from the masks without decoding images); computed
            from the `label` column when not given.
        image_areas (`dict[str, int]`, *optional*): per image id, `height * width` (for
            `gfss_hf.data.episodes.default_min_pixels` on datasets without a published threshold); read from the
            `label` column when needed and not given.
        description (`str`, *optional*): which images these are (printed by `scripts/evaluate.py`).

    Example:

    ```python
    >>> source = DatasetImageSource(builder.as_dataset(split="validation"))  # doctest: +SKIP
    >>> sample = source.get_by_id(source.ids[0])  # doctest: +SKIP
    ```
    """

    def __init__(
        self,
        dataset,
        pixel_counts: Mapping[str, Mapping[int, int]] | None = None,
        image_areas: Mapping[str, int] | None = None,
        description: str = "",
    ):
        missing = {"id", "image", "label"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"the dataset lacks column(s) {sorted(missing)}; an image source needs 'id', 'image' and 'label' "
                "(build it with a gfss_hf.data builder)."
            )
        self.dataset = dataset
        self.ids = [str(i) for i in dataset["id"]]
        self._row = {image_id: k for k, image_id in enumerate(self.ids)}
        if len(self._row) != len(self.ids):
            raise ValueError("the dataset repeats image ids; every row needs a unique 'id'.")
        self._pixel_counts = None if pixel_counts is None else {str(k): dict(v) for k, v in pixel_counts.items()}
        self._image_areas = None if image_areas is None else {str(k): int(v) for k, v in image_areas.items()}
        self.description = description

    def __len__(self) -> int:
        return len(self.ids)

    def get_by_id(self, image_id: str) -> dict:
        if image_id not in self._row:
            raise KeyError(f"image id {image_id!r} is not in this dataset ({len(self.ids)} images).")
        row = self.dataset[self._row[image_id]]
        return {"id": image_id, "image": row["image"], "label": np.asarray(row["label"])}

    def median_image_area(self) -> float:
        """Median of the images' pixel areas (`height * width`), for area thresholds relative to the image size."""
        if self._image_areas is None:
            self._image_areas = {
                str(r["id"]): int(np.asarray(r["label"]).size) for r in self.dataset.select_columns(["id", "label"])
            }
        return float(np.median([self._image_areas[i] for i in self.ids]))

    def pixel_counts(self) -> dict[str, dict[int, int]]:
        if self._pixel_counts is None:
            labels = self.dataset.select_columns(["id", "label"])
            self._pixel_counts = compute_pixel_counts((str(r["id"]), np.asarray(r["label"])) for r in labels)
        return self._pixel_counts


def _prepared(builder, split_name: str, download_mode: str | None = None) -> datasets.Dataset:
    builder.download_and_prepare(download_mode=download_mode)
    return builder.as_dataset(split=datasets.Split.VALIDATION if split_name == "val" else datasets.Split.TRAIN)


# -- per-dataset pieces ---------------------------------------------------------------------------------------------
def _require_data_dir(dataset: str, data_dir) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset={dataset!r} needs data_dir (--data_dir PATH); only 'synthetic' works without data.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir {str(root)!r} does not exist; pass the root of your {dataset} data.")
    return root


def _builtin_fold_split(name: str):
    def fold_split(fold: int, split_kind: str | None = None, data_dir=None) -> FoldSplit:
        return get_split(name, fold, split_kind)

    return fold_split


def _folder_fold_split(fold: int, split_kind: str | None = None, data_dir=None) -> FoldSplit:
    # The fold table is the folder's classes.json; check the layout first so that a wrong folder is named as such.
    _check_folder(_require_data_dir("folder", data_dir))
    return folder_split(data_dir, fold)


def _check_synthetic(root: Path) -> None:
    logger.warning(f"data_dir={str(root)!r} is ignored: the synthetic dataset is rendered in memory")


def _check_pascal(root: Path) -> None:
    voc = resolve_voc_root(root)
    for sub in ("JPEGImages", "SegmentationClassAug"):
        if not (voc / sub).is_dir():
            raise FileNotFoundError(
                f"{str(voc / sub)!r} does not exist; PASCAL-5i needs VOC2012/JPEGImages and the SBD-augmented "
                "masks in VOC2012/SegmentationClassAug."
            )


def _check_coco(root: Path) -> None:
    annotations = sorted((root / "annotations").glob("instances_*20*.json")) if (root / "annotations").is_dir() else []
    if not annotations:
        raise FileNotFoundError(
            f"no annotations/instances_train2014.json (or 2017) under {str(root)!r}; COCO-20i needs "
            "annotations/instances_{train,val}20XX.json and the train20XX/ and val20XX/ image folders."
        )


def _check_folder(root: Path) -> None:
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"{str(root / sub)!r} does not exist; a folder dataset needs images/, masks/ and classes.json."
            )
    read_folder_classes(root)


def _check_camvid(root: Path) -> None:
    check_camvid_layout(root)


def _pascal_builder(name: str):
    def builder(*, split_kind: str | None = None, **kwargs) -> Pascal5i:
        return Pascal5i(dataset=name, **kwargs)

    return builder


def _coco_builder(*, split_kind: str | None = None, **kwargs) -> Coco20i:
    return Coco20i(split_kind=split_kind or "interleaved", **kwargs)


def _folder_builder(*, split_kind: str | None = None, **kwargs) -> FolderSegmentation:
    return FolderSegmentation(**kwargs)


def _camvid_builder(*, split_kind: str | None = None, **kwargs) -> CamVid:
    return CamVid(**kwargs)


def _synthetic_images(split_name, *, num_images=None, image_size=None, seed=0, **_) -> SyntheticSegmentation:
    count = num_images if num_images is not None else (200 if split_name == "val" else 1000)
    return SyntheticSegmentation(split_name, count, image_size or DEFAULT_IMAGE_SIZE, seed)


def _pascal_images(name: str):
    def images(split_name, *, fold, data_dir, cache_dir=None, **_) -> DatasetImageSource:
        builder = Pascal5i(cache_dir=cache_dir, data_dir=data_dir, dataset=name, fold=fold, view=split_name)
        counts = pascal_pixel_counts(data_dir, split_name)
        return DatasetImageSource(
            _prepared(builder, split_name), pixel_counts=counts, description=f"PASCAL {split_name} list (standard)"
        )

    return images


def _coco_images(split_name, *, fold, data_dir, cache_dir=None, split_kind=None, **_) -> DatasetImageSource:
    masks = CocoSemanticMasks(data_dir, split_name)
    list_file = None
    description = f"all {len(masks.image_ids())} images of {masks.ann_file.name}"
    if split_name == "val":
        if standard_list_matches(masks):
            list_file = "standard"
            description = f"the standard COCO-20i val list ({masks.ann_file.name})"
        else:
            logger.warning(
                f"{masks.ann_file.name} does not hold every image of the standard COCO-20i val list (40,137 COCO "
                f"2014 val images); evaluating on {description} instead. Numbers are not comparable to "
                "published COCO-20i results."
            )
    builder = Coco20i(
        cache_dir=cache_dir,
        data_dir=data_dir,
        fold=fold,
        view=split_name,
        split_kind=split_kind or "interleaved",
        year=masks.year,
        **({"val_list": list_file} if split_name == "val" else {}),
    )
    counts = coco_pixel_counts(data_dir, split_name, year=masks.year, list_file=list_file)
    return DatasetImageSource(_prepared(builder, split_name), pixel_counts=counts, description=description)


def _folder_images(split_name, *, fold, data_dir, cache_dir=None, **_) -> DatasetImageSource:
    builder = FolderSegmentation(cache_dir=cache_dir, data_dir=data_dir, fold=fold, view=split_name)
    counts = folder_pixel_counts(data_dir, split_name)
    areas = folder_image_areas(data_dir, split_name)
    description = f"{len(folder_entries(data_dir, split_name))} images of the {split_name} list of {data_dir}"
    return DatasetImageSource(
        _prepared(builder, split_name), pixel_counts=counts, image_areas=areas, description=description
    )


def _camvid_images(split_name, *, fold, data_dir, cache_dir=None, **_) -> DatasetImageSource:
    builder = CamVid(cache_dir=cache_dir, data_dir=data_dir, fold=fold, view=split_name)
    counts = camvid_pixel_counts(data_dir, split_name)
    areas = camvid_image_areas(data_dir, split_name)
    description = f"the {len(camvid_entries(data_dir, split_name))} CamVid {split_name} images of {data_dir}"
    return DatasetImageSource(
        _prepared(builder, split_name), pixel_counts=counts, image_areas=areas, description=description
    )


# -- the registry ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """
    One dataset of the registry.

    Args:
        name (`str`): the `--dataset` value.
        needs_data_dir (`bool`): read from a folder (`False`: rendered in memory).
        fold_split (`Callable`): `(fold, split_kind=None, data_dir=None) -> FoldSplit`.
        check_layout (`Callable`): `(root: Path) -> None`; raises naming what is missing under `root`.
        images (`Callable`): `(split_name, *, fold, data_dir, cache_dir, split_kind, num_images, image_size, seed)`
            -> an image source (`ids`, `get_by_id`, `pixel_counts()`).
        builder (`Callable`, *optional*): `(*, split_kind, **builder_config) -> datasets.DatasetBuilder` of the
            [`GFSSBuilderMixin`] views; `None` for the in-memory dataset.
    """

    name: str
    needs_data_dir: bool
    fold_split: Callable[..., FoldSplit]
    check_layout: Callable[[Path], None]
    images: Callable[..., Any]
    builder: Callable[..., datasets.DatasetBuilder] | None = None


DATA_SOURCES: dict[str, DataSource] = {
    "synthetic": DataSource("synthetic", False, _builtin_fold_split("synthetic"), _check_synthetic, _synthetic_images),
    **{
        name: DataSource(
            name, True, _builtin_fold_split(name), _check_pascal, _pascal_images(name), _pascal_builder(name)
        )
        for name in PASCAL_DATASETS
    },
    "coco20i": DataSource("coco20i", True, _builtin_fold_split("coco20i"), _check_coco, _coco_images, _coco_builder),
    "camvid": DataSource(
        "camvid", True, _builtin_fold_split("camvid"), _check_camvid, _camvid_images, _camvid_builder
    ),
    "folder": DataSource("folder", True, _folder_fold_split, _check_folder, _folder_images, _folder_builder),
}
DATASET_NAMES: tuple[str, ...] = tuple(DATA_SOURCES)


def get_data_source(dataset: str) -> DataSource:
    """The registry entry of `dataset`, or an error listing the known names."""
    try:
        return DATA_SOURCES[dataset]
    except KeyError:
        raise ValueError(
            f"dataset={dataset!r} is not known; use one of {list(DATASET_NAMES)}, or wrap your own datasets.Dataset "
            "in DatasetImageSource."
        ) from None


def load_fold_split(dataset: str, fold: int, split_kind: str | None = None, data_dir: str | None = None) -> FoldSplit:
    """
    The fold table of `dataset` (a folder dataset reads it from its class file in `data_dir`).

    Example:

    ```python
    >>> load_fold_split("pascal5i", 0).novel_names
    ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle')
    ```
    """
    return get_data_source(dataset).fold_split(fold, split_kind, data_dir)


def check_data_dir(dataset: str, data_dir: str | None) -> None:
    """Raise a clear error when `data_dir` does not have the layout `dataset` needs (before any work); the in-memory
    dataset warns that a given `data_dir` is ignored."""
    source = get_data_source(dataset)
    if not source.needs_data_dir:
        if data_dir is not None:
            source.check_layout(Path(data_dir))
        return
    source.check_layout(_require_data_dir(dataset, data_dir))


def build_view(
    dataset: str,
    view: str,
    *,
    fold: int,
    data_dir: str,
    cache_dir: str | None = None,
    split_kind: str | None = None,
    min_pixels: int | None = None,
    novel_to_background: bool = False,
    rebuild: bool = False,
) -> datasets.Dataset:
    """
    A view of a dataset on disk (`"base_train"`, `"train"` or `"val"`, see `GFSSBuilderConfig`) through its
    builder, prepared (or read from the builder's cache) as a `datasets.Dataset`.

    Args:
        dataset (`str`): a registered dataset read from disk.
        view (`str`): the view.
        fold (`int`): the fold.
        data_dir (`str`): the dataset folder.
        cache_dir (`str`, *optional*): `datasets` cache of the builder.
        split_kind (`str`, *optional*): COCO-20i fold table.
        min_pixels (`int`, *optional*): area threshold of the base-training filter (default: the builder's).
        novel_to_background (`bool`, *optional*, defaults to `False`): `"base_train"`: novel pixels -> 0.
        rebuild (`bool`, *optional*, defaults to `False`): regenerate the prepared cache (edits a cache key cannot
            see), with `download_mode="force_redownload"`.
    """
    source = get_data_source(dataset)
    if source.builder is None:
        raise ValueError(f"dataset={dataset!r} is rendered in memory and has no builder views; use its image source.")
    kwargs: dict[str, Any] = dict(cache_dir=cache_dir, data_dir=data_dir, fold=fold, view=view)
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if view == "base_train":
        kwargs["novel_to_background"] = novel_to_background
    builder = source.builder(split_kind=split_kind, **kwargs)
    return _prepared(builder, "val" if view == "val" else "train", "force_redownload" if rebuild else None)


def load_image_source(
    dataset: str,
    split_name: str,
    *,
    fold: int = 0,
    split_kind: str | None = None,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    num_images: int | None = None,
    image_size: int | None = None,
    seed: int = 0,
):
    """
    The image source of one list of a dataset, for `build_episodes` and `evaluate_episodes`.

    Args:
        dataset (`str`): `"synthetic"` (rendered in memory, no files), `"pascal5i"`, `"pascal10i"`, `"coco20i"`
            (2014 or 2017: the standard val list when the annotation file holds it, else every image of the file),
            `"camvid"` (the SegNet tutorial's 11-class CamVid folders) or
            `"folder"` (your own images + masks + classes.json), built with the `gfss_hf.data` builders from
            `data_dir`.
        split_name (`str`): `"val"` or `"train"`.
        fold (`int`, *optional*, defaults to 0): fold of the builder config.
        split_kind (`str`, *optional*): COCO-20i fold table.
        data_dir (`str`, *optional*): the dataset folder (PASCAL / COCO / folder).
        cache_dir (`str`, *optional*): `datasets` cache of the builders.
        num_images (`int`, *optional*): synthetic: images of the list (200 val / 1000 train by default).
        image_size (`int`, *optional*): synthetic: side of the rendered images (96 by default).
        seed (`int`, *optional*, defaults to 0): synthetic: dataset seed.

    Example:

    ```python
    >>> val = load_image_source("synthetic", "val", num_images=8)
    >>> len(val.ids)
    8
    ```
    """
    if split_name not in ("val", "train"):
        raise ValueError(f"split_name={split_name!r} is not a list; use 'val' or 'train'.")
    source = get_data_source(dataset)
    if source.needs_data_dir and data_dir is None:
        raise ValueError(f"dataset={dataset!r} is read from disk: pass data_dir (the dataset folder).")
    return source.images(
        split_name,
        fold=fold,
        split_kind=split_kind,
        data_dir=data_dir,
        cache_dir=cache_dir,
        num_images=num_images,
        image_size=image_size,
        seed=seed,
    )
