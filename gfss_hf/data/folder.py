"""A builder for your own data: a folder of images, label masks and class names.

Layout:

```
my_data/
  images/<id>.jpg            (or .jpeg .png .bmp .webp .tif .tiff)
  masks/<id>.png             single-channel label PNGs: 0 background, 1..N classes, 255 ignore
  classes.json               (or classes.yaml / classes.yml)
  train.txt, val.txt         optional: one id per line; without them every mask is in both lists
```

`classes.json` gives the class names (id i + 1 for `names[i]`) and either explicit novel classes per fold (names
or ids) or a number of folds to split the classes into consecutive groups, PASCAL-5i style:

```json
{"names": ["cat", "dog", "car", "bus"], "folds": [["cat"], ["bus", "car"]]}
{"names": ["cat", "dog", "car", "bus"], "num_folds": 2}
```
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from ._builder import (
    GFSSBuilderConfig,
    GFSSBuilderMixin,
    ListSource,
    cached_pixel_counts,
    read_mask,
)
from .episodes import class_index_from_pixel_counts
from .splits import IGNORE_INDEX, FoldSplit

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FolderClasses",
    "read_folder_classes",
    "folder_split",
    "folder_entries",
    "folder_pixel_counts",
    "folder_image_areas",
    "folder_class_index",
    "folder_fingerprint",
    "FolderSegmentationConfig",
    "FolderSegmentation",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_CLASS_FILES = ("classes.json", "classes.yaml", "classes.yml")


@dataclass(frozen=True)
class FolderClasses:
    """Class names and fold table read from `classes.json` / `classes.yaml`.

    Args:
        names (`tuple[str, ...]`): class names, background excluded; `names[i]` is id `i + 1`.
        folds (`tuple[tuple[int, ...], ...]`): novel ids of each fold.
        dataset (`str`): dataset name (the `"dataset"` key, default: the folder name).
    """

    names: tuple[str, ...]
    folds: tuple[tuple[int, ...], ...]
    dataset: str

    def split(self, fold: int) -> FoldSplit:
        if not 0 <= fold < len(self.folds):
            raise ValueError(
                f"fold={fold} is not a fold of {self.dataset!r}; it has folds {list(range(len(self.folds)))}."
            )
        return FoldSplit.from_novel_ids(self.dataset, fold, self.names, self.folds[fold], split_kind="custom")


def _check_root(data_dir: str | os.PathLike | None) -> Path:
    if data_dir is None:
        raise ValueError("data_dir is None; pass the folder holding images/, masks/ and classes.json.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data folder {str(root)!r} does not exist; pass the folder holding images/, masks/ and classes.json."
        )
    for sub in ("images", "masks"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(
                f"folder {str(root / sub)!r} does not exist; put the {'RGB images' if sub == 'images' else 'label PNGs'}"
                f" in {sub}/ under {str(root)!r}."
            )
    return root


def read_folder_classes(data_dir: str | os.PathLike) -> FolderClasses:
    """Read the class names and fold table of a folder dataset (see the module docstring for the format)."""
    root = _check_root(data_dir)
    path = next((root / n for n in _CLASS_FILES if (root / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(
            f"no class file in {str(root)!r} (looked for {list(_CLASS_FILES)}); write classes.json with "
            '{"names": [...], "num_folds": K} or {"names": [...], "folds": [[novel...], ...]}.'
        )
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import yaml

            data = yaml.safe_load(path.read_text())
    except Exception as err:
        raise ValueError(f"class file {str(path)!r} cannot be parsed ({err}); fix its syntax.") from err
    if not isinstance(data, dict) or not isinstance(data.get("names"), list) or not data["names"]:
        raise ValueError(f"class file {str(path)!r} needs a non-empty 'names' list of class names (no background).")
    names = tuple(str(n) for n in data["names"])
    if "background" in (n.lower() for n in names):
        raise ValueError(
            f"class file {str(path)!r} lists 'background'; background is id 0 implicitly, remove it from 'names'."
        )
    n = len(names)
    if ("folds" in data) == ("num_folds" in data):
        raise ValueError(
            f"class file {str(path)!r} needs exactly one of 'folds' (novel classes per fold) or 'num_folds'."
        )
    if "num_folds" in data:
        k = data["num_folds"]
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"num_folds={k!r} in {str(path)!r} must be an integer in 1..{n} (number of classes).")
        folds = tuple(tuple(int(i) + 1 for i in chunk) for chunk in np.array_split(np.arange(n), k))
    else:
        folds = []
        for f, novel in enumerate(data["folds"]):
            ids = []
            for item in novel:
                if isinstance(item, str):
                    if item not in names:
                        raise ValueError(f"fold {f} of {str(path)!r} names {item!r}, which is not in 'names'.")
                    ids.append(names.index(item) + 1)
                elif isinstance(item, int) and 1 <= item <= n:
                    ids.append(item)
                else:
                    raise ValueError(f"fold {f} of {str(path)!r}: {item!r} is neither a class name nor an id 1..{n}.")
            folds.append(tuple(sorted(set(ids))))
        folds = tuple(folds)
    dataset = str(data.get("dataset", root.resolve().name))
    classes = FolderClasses(names, folds, dataset)
    for f in range(len(folds)):
        classes.split(f)  # validates each fold (non-empty, partition)
    return classes


def folder_split(data_dir: str | os.PathLike, fold: int) -> FoldSplit:
    """The `FoldSplit` of fold `fold` of a folder dataset."""
    return read_folder_classes(data_dir).split(fold)


def folder_entries(
    data_dir: str | os.PathLike, split: str = "val", list_file: str | os.PathLike | None = None
) -> list[tuple[str, Path, Path]]:
    """(id, image path, mask path) of the images of a list.

    The list is `list_file`, else `<data_dir>/<split>.txt`, else every mask in `masks/`. Every mask needs an image
    of the same stem in `images/`.
    """
    root = _check_root(data_dir)
    if list_file is None and (root / f"{split}.txt").is_file():
        list_file = root / f"{split}.txt"
    if list_file is not None:
        lf = Path(list_file)
        if not lf.is_file():
            raise FileNotFoundError(f"list file {str(lf)!r} does not exist; give an existing file of ids or None.")
        ids = [Path(line.split()[0]).stem for line in lf.read_text().splitlines() if line.strip()]
        masks = [root / "masks" / f"{i}.png" for i in ids]
        missing = [str(m) for m in masks if not m.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} mask(s) named by {str(lf)!r} do not exist, e.g. {missing[:3]}; add them or remove the "
                "ids from the list."
            )
    else:
        masks = sorted(p for p in (root / "masks").iterdir() if p.suffix.lower() == ".png")
        if not masks:
            raise FileNotFoundError(f"no .png mask in {str(root / 'masks')!r}; add label PNGs named <id>.png.")
    images: dict[str, list[Path]] = {}
    for p in sorted((root / "images").iterdir()):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.setdefault(p.stem, []).append(p)
    ambiguous = [paths for m in masks if len(paths := images.get(m.stem, [])) > 1]
    if ambiguous:
        raise ValueError(
            f"{len(ambiguous)} mask(s) match more than one image, e.g. {[str(p) for p in ambiguous[0]]} for "
            f"{str(root / 'masks' / ambiguous[0][0].stem)}.png; which one is labelled is ambiguous: keep one image per "
            "id (remove or rename the others)."
        )
    images = {stem: paths[0] for stem, paths in images.items()}
    out = []
    for m in masks:
        if m.stem not in images:
            raise FileNotFoundError(
                f"mask {str(m)!r} has no image: expected {str(root / 'images' / m.stem)}.<ext> with ext in "
                f"{list(IMAGE_EXTENSIONS)}; add the image or remove the mask."
            )
        out.append((m.stem, images[m.stem], m))
    return out


def folder_fingerprint(data_dir: str | os.PathLike, extra_files: tuple = ()) -> str:
    """
    A digest of the name, size and modification time of every file a folder dataset reads (`images/`, `masks/`, the
    class file, `train.txt` / `val.txt` and `extra_files`, e.g. list files elsewhere). It keys the builder's cache:
    an edited, replaced, added or removed file gives a new cache instead of the old examples.

    Content edits that keep both the size and the modification time (e.g. a copy that preserves mtimes) are not
    seen; rebuild then with `download_mode="force_redownload"` (`--rebuild_data` in `scripts/pretrain.py`).
    """
    root = _check_root(data_dir)
    h = hashlib.sha256()
    files = [p for sub in ("images", "masks") for p in (root / sub).iterdir()]
    files += [root / n for n in (*_CLASS_FILES, "train.txt", "val.txt")]
    files += [Path(f) for f in extra_files if f]
    for path in sorted(files):
        try:
            st = path.stat()
        except OSError:
            continue  # absent optional files (no val.txt) key as absent
        name = os.path.relpath(path, root) if path.is_relative_to(root) else str(path.resolve())
        h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def folder_pixel_counts(
    data_dir: str | os.PathLike,
    split: str = "val",
    list_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, dict[int, int]]:
    """Per image id, the pixel count of every class present; checks that mask values are within the classes."""
    classes = read_folder_classes(data_dir)
    entries = folder_entries(data_dir, split, list_file)
    counts = cached_pixel_counts("folder", [(i, str(m)) for i, _, m in entries], read_mask, cache_dir)
    n = len(classes.names)
    for image_id, _, mask in entries:
        bad = sorted(c for c in counts[image_id] if c > n and c != IGNORE_INDEX)
        if bad:
            raise ValueError(
                f"mask {str(mask)!r} holds values {bad} but {str(Path(data_dir))!r} declares {n} classes (values "
                f"0..{n}, {IGNORE_INDEX} = ignore); add the missing class names to the class file or fix the mask."
            )
    return counts


def folder_image_areas(
    data_dir: str | os.PathLike, split: str = "val", list_file: str | os.PathLike | None = None
) -> dict[str, int]:
    """Per image id, `height * width` of its mask (read from the PNG header, nothing decoded)."""
    areas = {}
    for image_id, _, mask in folder_entries(data_dir, split, list_file):
        with Image.open(mask) as handle:
            areas[image_id] = handle.width * handle.height
    return areas


def folder_class_index(
    data_dir: str | os.PathLike,
    split: str = "val",
    min_pixels: int = 2048,
    list_file: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[int, list[str]]:
    """Class id -> sorted image ids where the class covers >= `min_pixels` pixels."""
    counts = folder_pixel_counts(data_dir, split, list_file, cache_dir)
    n = len(read_folder_classes(data_dir).names)
    return class_index_from_pixel_counts(counts, min_pixels, class_ids=range(1, n + 1))


@dataclass
class FolderSegmentationConfig(GFSSBuilderConfig):
    """Configuration of [`FolderSegmentation`] (fields of [`GFSSBuilderConfig`] plus the ones below).

    Args:
        train_list (`str`, *optional*): ids of the train/base_train views (default: `train.txt` or all masks).
        val_list (`str`, *optional*): ids of the val view (default: `val.txt` or all masks).
        index_cache_dir (`str`, *optional*): where the per-class pixel counts are cached.
        data_fingerprint (`str`, *optional*): set by [`FolderSegmentation`] from [`folder_fingerprint`] (any value
            passed is replaced): the cache of the prepared dataset is keyed by the files, not only by the path.
    """

    train_list: str | None = None
    val_list: str | None = None
    index_cache_dir: str | None = None
    data_fingerprint: str | None = None


class FolderSegmentation(GFSSBuilderMixin, datasets.GeneratorBasedBuilder):
    """Builder over `images/` + `masks/` + `classes.json`: `{"id", "image", "label"}` examples.

    Example:

    ```python
    >>> builder = FolderSegmentation(cache_dir="/tmp/cache", data_dir="my_data", fold=0, view="val")
    >>> builder.download_and_prepare()
    >>> val = builder.as_dataset(split="validation")
    >>> builder.fold_split.novel_names
    ```
    """

    BUILDER_CONFIG_CLASS = FolderSegmentationConfig
    VERSION = datasets.Version("1.0.0")
    DESCRIPTION = "User folder dataset for GFSS"

    def __init__(self, *args, **kwargs):
        # datasets reuses a prepared cache whose config kwargs hash the same; with the path alone an edited mask or
        # replaced image kept returning the old examples. The fingerprint of the files is part of the kwargs.
        # To rebuild regardless: download_and_prepare(download_mode="force_redownload").
        kwargs.pop("data_fingerprint", None)
        if kwargs.get("data_dir") is not None:
            lists = (kwargs.get("train_list"), kwargs.get("val_list"))
            kwargs["data_fingerprint"] = folder_fingerprint(kwargs["data_dir"], lists)
        super().__init__(*args, **kwargs)

    @property
    def fold_split(self) -> FoldSplit:
        return folder_split(self.config.data_dir, self.config.fold)

    def _list_source(self, split: str) -> ListSource:
        cfg = self.config
        list_file = self._list_file(split)
        entries = folder_entries(cfg.data_dir, split, list_file)
        # Checks every mask's values against the class file before anything is written, whatever the view.
        counts = folder_pixel_counts(cfg.data_dir, split, list_file, cfg.index_cache_dir)
        return ListSource(entries=entries, read_label=read_mask, pixel_counts=lambda: counts)
