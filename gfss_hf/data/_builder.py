"""Shared plumbing of the dataset builders: configs, the view template, list files, image/mask reading, index caches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError
from transformers.utils import logging

from .._io import atomic_write_json
from ..image_processing_gfss import load_image
from .episodes import compute_pixel_counts

logger = logging.get_logger(__name__)

__all__ = [
    "VIEWS",
    "GFSSBuilderConfig",
    "GFSSBuilderMixin",
    "ListSource",
    "base_training_entries",
    "config_kwargs",
    "read_list_file",
    "read_mask",
    "read_rgb",
    "image_feature_value",
    "default_index_cache_dir",
    "cached_pixel_counts",
    "segmentation_features",
]

VIEWS = ("base_train", "train", "val")
_BASE_FIELDS = {"name", "version", "data_files", "description"}


@dataclass
class GFSSBuilderConfig(datasets.BuilderConfig):
    """Fields shared by the GFSS builders.

    Args:
        fold (`int`, defaults to 0): the fold whose novel classes the `"base_train"` view removes.
        view (`str`, defaults to `"base_train"`): `"base_train"` (train list, images with >= 1 base class of
            >= `min_pixels` px, labels via `FoldSplit.to_base_training`), `"train"` (train list, dataset ids) or
            `"val"` (val list, dataset ids).
        min_pixels (`int`, defaults to 2048): area threshold of the base-training filter (2 * 32 * 32).
        novel_to_background (`bool`, defaults to `False`): in `"base_train"`, novel pixels -> 0 instead of 255.
    """

    fold: int = 0
    view: str = "base_train"
    min_pixels: int = 2048
    novel_to_background: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.view not in VIEWS:
            raise ValueError(f"view={self.view!r} is not known; use one of {list(VIEWS)}.")
        if self.min_pixels < 0:
            raise ValueError(f"min_pixels={self.min_pixels} must be >= 0.")


@dataclass
class ListSource:
    """What a builder supplies to the view template of [`GFSSBuilderMixin`] for one list (`"train"` or `"val"`).

    Args:
        entries (`list[tuple[str, Path, Any]]`): (image id, image path, label handle) per image, in list order.
        read_label (`Callable[[Any], np.ndarray]`): label handle -> `uint8` array `(H, W)` of dataset ids (a mask
            path for files on disk, an image id for COCO's annotation-built masks). It travels to
            `_generate_examples`, so it must pickle (a module-level function or a bound method).
        pixel_counts (`Callable[[], Mapping[str, Mapping[int, int]]]`): per image id, the pixel count of every class
            present; called only by the `"base_train"` view (it may read every mask once, or a cache).
    """

    entries: list[tuple[str, Path, Any]]
    read_label: Callable[[Any], np.ndarray]
    pixel_counts: Callable[[], Mapping[str, Mapping[int, int]]]


def base_training_entries(
    entries: Sequence[tuple], pixel_counts: Mapping[str, Mapping[int, int]], base_ids: Iterable[int], min_pixels: int
) -> list[tuple]:
    """The entries (image id first) whose image has a base class covering >= `min_pixels` pixels."""
    base = set(base_ids)
    return [e for e in entries if any(n >= min_pixels and c in base for c, n in pixel_counts[e[0]].items())]


class GFSSBuilderMixin:
    """Shared builder behaviour: `from_config`, data errors surfaced as themselves, and the three views.

    The views (`"base_train"`, `"train"`, `"val"`, see [`GFSSBuilderConfig`]) are one template: a builder supplies
    its `fold_split` and `_list_source(split)` (a [`ListSource`]: the list's entries, a label reader, the pixel
    counts); the template picks the list, filters the base-training images, checks each mask against its image and
    the fold's classes, and remaps base-training labels. A builder with its own generation (the procedural one)
    overrides `_split_generators` / `_generate_examples`.

    `datasets` wraps any error raised while generating examples in a generic `DatasetGenerationError`; the errors
    raised here name the bad file and the fix, so they are re-raised unwrapped (the partial cache is removed by
    `datasets` before that).
    """

    @classmethod
    def from_config(cls, config: datasets.BuilderConfig, cache_dir: str | None = None, **kwargs):
        """Instantiate from a config instance (datasets builders take config fields as keyword arguments)."""
        return cls(cache_dir=cache_dir, **config_kwargs(config), **kwargs)

    def download_and_prepare(self, *args, **kwargs):
        try:
            return super().download_and_prepare(*args, **kwargs)
        except datasets.exceptions.DatasetGenerationError as err:
            cause = err.__cause__
            if isinstance(cause, (ValueError, OSError, KeyError)):
                raise cause.with_traceback(cause.__traceback__) from None
            raise

    # A builder's one-line description; the features are the same for every builder.
    DESCRIPTION = ""

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description=self.DESCRIPTION, features=segmentation_features())

    def _list_source(self, split: str) -> ListSource:
        """The entries, label reader and pixel counts of the `split` list (`"train"` or `"val"`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _list_source(split) for the view template.")

    def _split_generators(self, dl_manager):
        cfg = self.config
        split = "val" if cfg.view == "val" else "train"
        source = self._list_source(split)
        fold_split = self.fold_split
        entries = source.entries
        if cfg.view == "base_train":
            entries = base_training_entries(entries, source.pixel_counts(), fold_split.base_ids, cfg.min_pixels)
            if not entries:
                # `datasets` would fail later with "Instruction train corresponds to no data", naming nothing.
                names = ", ".join(fold_split.base_names)
                raise ValueError(
                    f"no image of the {split} list of {cfg.data_dir!r} has a base class ({names}) covering >= "
                    f"{cfg.min_pixels} px, so fold {cfg.fold} has nothing to pre-train on; lower min_pixels (e.g. "
                    "--set min_pixels=256 for small images) or check the masks' values."
                )
            logger.info(
                f"{self.name} base_train fold {cfg.fold}: {len(entries)} images with a base class >= {cfg.min_pixels} px"
            )
        name = datasets.Split.VALIDATION if cfg.view == "val" else datasets.Split.TRAIN
        gen_kwargs = {"entries": entries, "read_label": source.read_label, "fold_split": fold_split}
        return [datasets.SplitGenerator(name=name, gen_kwargs=gen_kwargs)]

    def _generate_examples(self, entries, read_label, fold_split):
        cfg = self.config
        for k, (image_id, image_path, handle) in enumerate(entries):
            image, (height, width) = image_feature_value(image_path)
            label = read_label(handle)
            if label.shape != (height, width):
                raise ValueError(
                    f"mask {str(handle)!r} is {label.shape[1]}x{label.shape[0]} but image {str(image_path)!r} is "
                    f"{width}x{height}; masks must have their image's size: fix the list or the files."
                )
            if cfg.view == "base_train":
                label = fold_split.to_base_training(label, novel_to_background=cfg.novel_to_background)
            else:
                label = fold_split.check_label(label)
            yield k, {"id": image_id, "image": image, "label": Image.fromarray(np.ascontiguousarray(label), "L")}

    def _list_file(self, split: str) -> str | None:
        """The config's custom list of `split` (`train_list` / `val_list`), or None for the builder's default."""
        return getattr(self.config, f"{split}_list", None)


def config_kwargs(config: datasets.BuilderConfig) -> dict[str, Any]:
    """Keyword arguments that rebuild `config` through a builder's constructor.

    `datasets` builders take the config fields as keyword arguments (they hash them into the cache path); this turns
    a config instance into those arguments.
    """
    out = {}
    for f in dataclasses.fields(config):
        if f.name in _BASE_FIELDS:
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        out[f.name] = str(value) if isinstance(value, os.PathLike) else value
    return out


def segmentation_features() -> datasets.Features:
    """`{"id": string, "image": Image (RGB), "label": Image (mode L)}`."""
    return datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.Image()})


def read_list_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a list file of `image_relpath mask_relpath` lines (blank lines skipped).

    A line with a single token `X` is read as `JPEGImages/X.jpg SegmentationClassAug/X.png`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"list file {str(path)!r} does not exist; give an existing list file or None for the standard one."
        )
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1:
            parts = [f"JPEGImages/{parts[0]}.jpg", f"SegmentationClassAug/{parts[0]}.png"]
        if len(parts) != 2:
            raise ValueError(
                f"{path}:{lineno}: expected 'image_path mask_path' (or a bare id), got {line!r}; fix that line."
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a label PNG as a `uint8` array of shape `(H, W)` (palette indices for palette PNGs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask {str(path)!r} does not exist; check the data folder and the list file.")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(
                    f"mask {str(path)!r} has mode {im.mode!r}; masks must be single-channel label PNGs (mode P or L) "
                    "holding class ids, not colour images. Convert it to class ids."
                )
            # The package's one loader: oriented like its image (EXIF), in its stored mode.
            arr = np.asarray(load_image(im, name=f"mask {str(path)!r}", mode=None))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"mask {str(path)!r} cannot be read ({err}); replace or remove the file.") from err
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"mask {str(path)!r} has values outside 0..255; store class ids 0..N and 255 = ignore.")
        arr = arr.astype(np.uint8)
    return arr


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image as a loaded PIL RGB image, with an error naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist; check the data folder and the list file.")
    try:
        with Image.open(path) as im:
            im.load()
            # The package's one loader: EXIF orientation applied, as `datasets` decodes the stored bytes, so the
            # size returned here is the size of the decoded example and of its mask.
            return load_image(im, name=f"image {str(path)!r}")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image {str(path)!r} cannot be read ({err}); replace or remove the file.") from err


def image_feature_value(path: str | os.PathLike) -> tuple[dict | Image.Image, tuple[int, int]]:
    """What to yield for an `Image()` feature, and the image's (height, width).

    RGB JPEG/PNG files are stored as their original bytes (exact, compact, self-contained); other files are
    decoded and stored as RGB PIL images. The file is fully decoded either way, so a corrupt file fails here with
    an error naming it.
    """
    path = Path(path)
    image = read_rgb(path)
    with Image.open(path) as im:
        original_format, original_mode = im.format, im.mode
    if original_mode == "RGB" and original_format in ("JPEG", "PNG"):
        return {"path": None, "bytes": path.read_bytes()}, (image.height, image.width)
    return image, (image.height, image.width)


def default_index_cache_dir() -> Path:
    """Folder for the per-class index caches: `$HF_DATASETS_CACHE/gfss_hf_index`."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "gfss_hf_index"


def _fingerprint(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _stat_key(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}-{st.st_mtime_ns}"


def cached_pixel_counts(
    name: str,
    items: Sequence[tuple[str, str]],
    load_label: Callable[[str], np.ndarray],
    cache_dir: str | os.PathLike | None,
    extra_key: Sequence[str] = (),
) -> dict[str, dict[int, int]]:
    """Per-image class pixel counts, cached as JSON keyed on the (id, mask path) list.

    Args:
        name (`str`): prefix of the cache file.
        items (`Sequence[tuple[str, str]]`): (image id, mask path) pairs.
        load_label (`Callable[[str], np.ndarray]`): reads one mask path to a `uint8` array.
        cache_dir (`str`, *optional*): folder of the cache; `None` uses `default_index_cache_dir()`; `False`-y
            empty string disables caching.
        extra_key (`Sequence[str]`, *optional*): more strings that change the cache key.
    """
    # Path, size and mtime of every mask: an edited mask invalidates the cache.
    key = _fingerprint([name, *extra_key, *(f"{i}\t{os.path.abspath(p)}\t{_stat_key(p)}" for i, p in items)])
    path = None
    if cache_dir != "":
        path = Path(cache_dir if cache_dir is not None else default_index_cache_dir()) / f"{name}-{key}.json"
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                return {i: {int(c): int(n) for c, n in counts.items()} for i, counts in data["pixel_counts"].items()}
            except (ValueError, KeyError) as err:
                logger.warning(f"ignoring the unreadable index cache {path} ({err}); recomputing it")
    counts = compute_pixel_counts((image_id, load_label(mask_path)) for image_id, mask_path in items)
    if path is not None:
        atomic_write_json(path, {"pixel_counts": {i: {str(c): n for c, n in v.items()} for i, v in counts.items()}})
    return counts
