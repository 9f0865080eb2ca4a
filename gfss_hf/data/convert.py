"""Convert the annotation formats people have into the folder layout of [`FolderSegmentation`]
(`gfss_hf.data.folder`): `images/`, `masks/` (0 background, 1..N classes, 255 ignore), `classes.json`, `train.txt`,
`val.txt`.

Three readers, one writer:

- [`coco_samples`]: COCO instance JSON of any year and any category set. Semantic masks follow
  [`~gfss_hf.data.coco.semantic_mask`]: non-crowd annotations painted in annotation order (a later instance
  overwrites an earlier one), categories ranked by `category_id`, optional crowd -> ignore.
- [`yolo_samples`]: Ultralytics YOLO segmentation labels (`class x1 y1 x2 y2 ...`, coordinates normalised to
  [0, 1]) next to their images (`images/<split>/` + `labels/<split>/`, or a `data.yaml`); class names from the
  `data.yaml` or a list. Polygons are scaled to pixel coordinates (`x * width`, `y * height`) and filled with PIL
  (pixels on the outline included), later lines over earlier ones; an image without a label file is all
  background.
- [`index_mask_samples`]: label images holding class indices: CamVid-like (`train/ trainannot/ val/ valannot/`,
  same file names) or Cityscapes-like (`leftImg8bit/<split>/<city>/*_leftImg8bit.png` +
  `gtFine/<split>/<city>/*_gtFine_labelIds.png`), with a void value (-> 255) and either class names by value or an
  explicit value -> name mapping.

A dataset WITHOUT a background class (CamVid: every labelled pixel belongs to one of its classes) is converted with
`has_background=False`: source value k -> id k + 1, so value 0 of the output never occurs, and void -> 255. The
output is then a dataset whose "background" is empty: in few-shot episodes every pixel is a class or ignored.

[`write_folder_dataset`] applies the class selection (`classes`: keep these, in this order; the others become
background, or ignore with `unselected="ignore"`) and renaming (`rename={"old": "new"}`), writes the folder into a
temporary sibling and renames it into place (a failed conversion leaves no half folder), and returns the pixel
count of every output value per image. Images are copied byte for byte, except files with an EXIF orientation,
which are written as PNG in the frame the annotations use, so that every reader sees the pixels the masks label.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from transformers.utils import logging

from .._io import atomic_folder
from ..image_processing_gfss import load_image
from ._builder import read_mask, read_rgb
from .coco import semantic_mask
from .folder import IMAGE_EXTENSIONS, read_folder_classes
from .splits import CAMVID_CLASSES, CAMVID_VOID, IGNORE_INDEX

logger = logging.get_logger(__name__)

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_VOID",
    "SourceSample",
    "ClassMap",
    "ConversionResult",
    "coco_samples",
    "read_yolo_names",
    "rasterize_yolo_polygons",
    "yolo_samples",
    "index_mask_samples",
    "write_folder_dataset",
]

_SPLITS = ("train", "val")
_ORIENTATION_TAG = 0x0112
# EXIF orientations 5..8 rotate by 90 degrees: the upright image has width and height swapped.
_SWAPS_SIDES = (5, 6, 7, 8)


@dataclass
class SourceSample:
    """One annotated image of a source dataset, labels in SOURCE ids: 0 background, `k` for `source_names[k - 1]`,
    255 ignore.

    Args:
        split (`str`): `"train"` or `"val"`.
        stem (`str`): the image id to use (made unique by the writer).
        image_path (`Path`): the image file.
        label (`np.ndarray`): `(H, W)` uint8 source ids.
        frame (`str`): `"raw"` (the label is in the stored pixel frame, COCO / index masks) or `"upright"` (in the
            EXIF-rotated frame, YOLO).
    """

    split: str
    stem: str
    image_path: Path
    label: np.ndarray
    frame: str = "raw"


@dataclass(frozen=True)
class ClassMap:
    """Source ids -> output ids after class selection and renaming.

    Args:
        names (`tuple[str, ...]`): output class names; `names[i]` is output id `i + 1`.
        lut (`np.ndarray`): `(256,)` int16 table, source value -> output value; -1 marks values the source does not
            define (an error when met).
        renamed (`dict[str, str]`): the renames applied.
        num_source (`int`): number of source classes.
    """

    names: tuple[str, ...]
    lut: np.ndarray
    renamed: dict = field(default_factory=dict)
    num_source: int = 0

    @classmethod
    def build(
        cls,
        source_names: Sequence[str],
        classes: Sequence[str] | None = None,
        rename: Mapping[str, str] | None = None,
        unselected: str = "background",
    ) -> ClassMap:
        """
        Args:
            source_names (`Sequence[str]`): source class names; `source_names[k - 1]` is source id `k`.
            classes (`Sequence[str]`, *optional*): source names to keep, in the output order (default: all, in
                source order).
            rename (`Mapping[str, str]`, *optional*): old (source) name -> new name.
            unselected (`str`, *optional*, defaults to `"background"`): what the classes not kept become:
                `"background"` (0) or `"ignore"` (255).
        """
        source_names = [str(n) for n in source_names]
        if not 1 <= len(source_names) < IGNORE_INDEX:
            raise ValueError(f"the source has {len(source_names)} classes; 1..254 fit in 8-bit label PNGs.")
        dupes = sorted({n for n in source_names if source_names.count(n) > 1})
        if dupes:
            raise ValueError(f"the source names {dupes} more than once; give each class a distinct name (--rename).")
        if unselected not in ("background", "ignore"):
            raise ValueError(f"unselected={unselected!r} is invalid; use 'background' (0) or 'ignore' (255).")
        keep = list(source_names) if classes is None else [str(c) for c in classes]
        unknown = [c for c in keep if c not in source_names]
        if unknown:
            raise ValueError(
                f"classes {unknown} are not in the source, whose classes are {source_names}; pick "
                "names from that list (before renaming)."
            )
        if len(set(keep)) != len(keep) or not keep:
            raise ValueError(f"classes={keep} must be a non-empty list without repeats.")
        rename = {str(k): str(v) for k, v in (rename or {}).items()}
        not_kept = [old for old in rename if old not in keep]
        if not_kept:
            raise ValueError(
                f"rename names {not_kept}, which are not among the kept classes {keep}; rename a kept "
                "class (use its source name)."
            )
        names = tuple(rename.get(n, n) for n in keep)
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"after renaming, the names {clash} are given to several classes; names must be unique.")
        if any(n.lower() == "background" for n in names):
            raise ValueError(
                "a class is named 'background'; background is id 0 implicitly: leave it out of the "
                "classes (its pixels are 0) or rename it."
            )
        lut = np.full(256, -1, dtype=np.int16)
        lut[0] = 0
        lut[IGNORE_INDEX] = IGNORE_INDEX
        for k, name in enumerate(source_names, start=1):
            lut[k] = keep.index(name) + 1 if name in keep else (0 if unselected == "background" else IGNORE_INDEX)
        return cls(names, lut, rename, len(source_names))

    def apply(self, label: np.ndarray, where: str = "label") -> np.ndarray:
        """Source label -> output label (uint8); values the source does not define raise an error naming `where`."""
        out = self.lut[label]
        if (out < 0).any():
            bad = sorted(int(v) for v in np.unique(label[out < 0]))
            raise ValueError(
                f"{where} holds values {bad} that are no source class (0 background, 1..{self.num_source}"
                " classes, 255 ignore); declare them or mark them void."
            )
        return out.astype(np.uint8)


@dataclass
class ConversionResult:
    """What [`write_folder_dataset`] wrote.

    Args:
        output_dir (`Path`): the folder dataset.
        names (`tuple[str, ...]`): class names, id `i + 1` for `names[i]`.
        train_ids, val_ids (`list[str]`): the lists.
        pixel_counts (`dict[str, dict[int, int]]`): per image id, the pixel count of every output value (0 and 255
            included).
        warnings (`list[str]`): what the user should know (also logged).
    """

    output_dir: Path
    names: tuple[str, ...]
    train_ids: list[str]
    val_ids: list[str]
    pixel_counts: dict[str, dict[int, int]]
    warnings: list[str]


# -- COCO -----------------------------------------------------------------------------------------------------------
def coco_samples(
    splits: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]], crowd_to_ignore: bool = False
) -> tuple[list[str], Iterator[SourceSample]]:
    """
    Read COCO instance annotation files.

    Args:
        splits (`Mapping[str, tuple]`): split (`"train"`, `"val"`) -> (annotation JSON, image folder).
        crowd_to_ignore (`bool`, *optional*, defaults to `False`): crowd regions still background -> 255.

    Returns:
        `(source_names, samples)`: the category names ranked by `category_id`, and a lazy iterator of
        [`SourceSample`] (file order, split by split). Every file and image is checked before it is returned.
    """
    from pycocotools.coco import COCO

    loaded, names, categories = {}, None, None
    for split, (ann_file, image_dir) in splits.items():
        _check_split(split)
        ann_file, image_dir = Path(ann_file), Path(image_dir)
        if not ann_file.is_file():
            raise FileNotFoundError(
                f"COCO annotation file {str(ann_file)!r} ({split}) does not exist; give the "
                "instances_<split><year>.json file."
            )
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco = COCO(str(ann_file))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{str(ann_file)!r} is not a COCO instance annotation file ({err}).") from err
        cats = {int(c["id"]): str(c["name"]) for c in coco.dataset.get("categories", [])}
        if not cats:
            raise ValueError(f"{str(ann_file)!r} has no 'categories'; a COCO instance file lists them.")
        if categories is None:
            categories = cats
            names = [cats[c] for c in sorted(cats)]
        elif cats != categories:
            raise ValueError(
                f"{str(ann_file)!r} has other categories than the first annotation file; convert files "
                "of one category set together."
            )
        missing = [
            str(image_dir / im["file_name"])
            for im in coco.dataset["images"]
            if not (image_dir / im["file_name"]).is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} image(s) of {str(ann_file)!r} are not in {str(image_dir)!r}, e.g."
                f" {missing[:3]}; give the image folder of that file."
            )
        loaded[split] = (coco, image_dir)
    category_to_id = {cat: rank + 1 for rank, cat in enumerate(sorted(categories))}

    def generate():
        for split, (coco, image_dir) in loaded.items():
            for info in coco.dataset["images"]:
                label = semantic_mask(coco, info, category_to_id, crowd_to_ignore)
                path = image_dir / info["file_name"]
                yield SourceSample(split, Path(info["file_name"]).stem, path, label, "raw")

    return names, generate()


# -- YOLO -----------------------------------------------------------------------------------------------------------
def read_yolo_names(names_or_yaml) -> list[str]:
    """Class names of a YOLO dataset: a `data.yaml` path (its `names`: a list or an `{index: name}` mapping), or a
    list of names (index `i` is `names[i]`)."""
    if isinstance(names_or_yaml, (str, os.PathLike)):
        import yaml

        path = Path(names_or_yaml)
        if not path.is_file():
            raise FileNotFoundError(f"YOLO data file {str(path)!r} does not exist; give the dataset's data.yaml.")
        data = yaml.safe_load(path.read_text()) or {}
        names = data.get("names") if isinstance(data, dict) else None
        if names is None:
            raise ValueError(f"{str(path)!r} has no 'names'; add the class names (a list) or pass them directly.")
        names_or_yaml = names
    if isinstance(names_or_yaml, Mapping):
        keys = sorted(int(k) for k in names_or_yaml)
        if keys != list(range(len(keys))):
            raise ValueError(f"YOLO class indices {keys} must be 0..N-1 without gaps.")
        return [str(names_or_yaml[k] if k in names_or_yaml else names_or_yaml[str(k)]) for k in keys]
    return [str(n) for n in names_or_yaml]


def rasterize_yolo_polygons(
    label_file: str | os.PathLike | None, height: int, width: int, num_classes: int
) -> np.ndarray:
    """
    The source label map (0 background, class index + 1) of one YOLO segmentation label file.

    Args:
        label_file (`str` or `os.PathLike`, *optional*): the `.txt` file; `None` or a missing file: no object.
        height, width (`int`): the image size in pixels (upright, as Ultralytics reads it).
        num_classes (`int`): number of classes (indices must be below it).

    Returns:
        `np.ndarray` of shape `(height, width)`, uint8.
    """
    canvas = Image.new("L", (width, height), 0)
    if label_file is None or not Path(label_file).is_file():
        return np.asarray(canvas).copy()
    draw = ImageDraw.Draw(canvas)
    for lineno, line in enumerate(Path(label_file).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{label_file}:{lineno}"
        if len(parts) == 5:
            raise ValueError(
                f"{where} is a box (class x y w h), not a polygon; convert segmentation labels "
                "(class x1 y1 x2 y2 ...), e.g. from a YOLO 'segment' dataset."
            )
        try:
            cls, coords = int(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            raise ValueError(f"{where}: {line!r} is not 'class x1 y1 x2 y2 ...' with numbers.") from None
        if len(coords) < 6 or len(coords) % 2:
            raise ValueError(
                f"{where}: a polygon needs an even number of coordinates, at least 3 points; got "
                f"{len(coords)} numbers."
            )
        if not 0 <= cls < num_classes:
            raise ValueError(
                f"{where}: class {cls} is not among the {num_classes} class names (0..{num_classes - 1});"
                " add its name or fix the label."
            )
        xy = np.asarray(coords).reshape(-1, 2)
        if xy.min() < 0 or xy.max() > 1:
            raise ValueError(
                f"{where}: coordinates must be normalised to [0, 1], got [{xy.min():.3g}, "
                f"{xy.max():.3g}]; divide pixel coordinates by the image width / height."
            )
        points = [(x * width, y * height) for x, y in xy]
        draw.polygon(points, fill=cls + 1, outline=cls + 1)
    return np.asarray(canvas).copy()


def _label_path(image_path: Path) -> Path:
    # Ultralytics' rule: the last "images" folder of the path becomes "labels", the suffix ".txt".
    parts = list(image_path.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image_path.with_suffix(".txt")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def yolo_samples(
    root: str | os.PathLike, names=None, data_yaml: str | os.PathLike | None = None
) -> tuple[list[str], Iterator[SourceSample]]:
    """
    Read an Ultralytics YOLO segmentation dataset.

    Args:
        root (`str` or `os.PathLike`): the dataset folder: `images/train/`, `images/val/` (or a flat `images/`) with
            `labels/...` mirroring them; or the folder of a `data.yaml`.
        names (`list[str]` or `dict[int, str]`, *optional*): class names (default: the `data.yaml`'s).
        data_yaml (`str`, *optional*): the data file (default: `root/data.yaml` when present). Its `train` / `val`
            entries (folders, relative to its `path` or to `root`) select the images.

    Returns:
        `(source_names, samples)`; a flat `images/` folder is returned as the train split only.
    """
    import yaml

    root = Path(root)
    if data_yaml is None and (root / "data.yaml").is_file():
        data_yaml = root / "data.yaml"
    split_dirs: dict[str, list[Path]] = {}
    if data_yaml is not None:
        data = yaml.safe_load(Path(data_yaml).read_text()) or {}
        base = Path(data.get("path") or root)
        base = base if base.is_absolute() else (Path(data_yaml).parent / base)
        for split in _SPLITS:
            entry = data.get(split)
            if entry:
                split_dirs[split] = [base / e for e in ([entry] if isinstance(entry, str) else entry)]
        if names is None:
            names = read_yolo_names(data_yaml)
    elif (root / "images" / "train").is_dir():
        split_dirs = {s: [root / "images" / s] for s in _SPLITS if (root / "images" / s).is_dir()}
    elif (root / "images").is_dir():
        split_dirs = {"train": [root / "images"]}
    else:
        raise FileNotFoundError(
            f"{str(root)!r} has neither a data.yaml nor an images/ folder; give the YOLO dataset "
            "folder (images/<split>/ + labels/<split>/)."
        )
    if names is None:
        raise ValueError(f"no class names for {str(root)!r}: there is no data.yaml; pass the names (index order).")
    names = read_yolo_names(names)
    files: dict[str, list[Path]] = {}
    for split, dirs in split_dirs.items():
        for d in dirs:
            if not d.is_dir():
                raise FileNotFoundError(
                    f"YOLO {split} folder {str(d)!r} does not exist; fix the data.yaml or the folder."
                )
        files[split] = [p for d in dirs for p in _image_files(d)]
        if not files[split]:
            raise FileNotFoundError(f"no image in the YOLO {split} folder(s) {[str(d) for d in dirs]}.")

    def generate():
        for split, paths in files.items():
            for path in paths:
                height, width = _upright_size(path)
                label = rasterize_yolo_polygons(_label_path(path), height, width, len(names))
                yield SourceSample(split, path.stem, path, label, "upright")

    return names, generate()


# -- index masks ----------------------------------------------------------------------------------------------------
def _index_pairs(root: Path, layout: str) -> dict[str, list[tuple[Path, Path]]]:
    pairs: dict[str, list[tuple[Path, Path]]] = {}
    if layout == "camvid":
        for split in _SPLITS:
            images, masks = root / split, root / f"{split}annot"
            if not images.is_dir():
                continue
            if not masks.is_dir():
                raise FileNotFoundError(f"{str(images)!r} has no label folder {str(masks)!r} beside it.")
            found = []
            for image in _image_files(images):
                mask = next((m for m in (masks / image.name, masks / f"{image.stem}.png") if m.is_file()), None)
                if mask is None:
                    raise FileNotFoundError(
                        f"image {str(image)!r} has no label {str(masks / image.name)!r}; add it or remove the image."
                    )
                found.append((image, mask))
            pairs[split] = found
    elif layout == "cityscapes":
        for split in _SPLITS:
            images = root / "leftImg8bit" / split
            if not images.is_dir():
                continue
            found = []
            for image in sorted(images.rglob("*_leftImg8bit.png")):
                stem = image.name[: -len("_leftImg8bit.png")]
                mask = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
                if not mask.is_file():
                    raise FileNotFoundError(
                        f"image {str(image)!r} has no label {str(mask)!r}; add it or remove the image."
                    )
                found.append((image, mask))
            pairs[split] = found
    else:
        raise ValueError(f"layout={layout!r} is not known; use 'camvid', 'cityscapes' or None (detect).")
    if not any(pairs.values()):
        raise FileNotFoundError(f"no image/label pair found in {str(root)!r} with the {layout!r} layout.")
    return pairs


def index_mask_samples(
    root: str | os.PathLike,
    names: Sequence[str] | None = None,
    mapping: Mapping[int, str] | None = None,
    has_background: bool = True,
    void: Sequence[int] = (),
    unlisted: str = "ignore",
    layout: str | None = None,
) -> tuple[list[str], Iterator[SourceSample]]:
    """
    Read a dataset of index label images.

    Give EITHER `names` (classes by value) OR `mapping` (value -> name):

    - `names` with `has_background=True`: value 0 is background, value `k` is `names[k - 1]`.
    - `names` with `has_background=False` (CamVid): value `k` is `names[k]` (source id `k + 1`); no pixel is
      background.
    - `mapping` (Cityscapes `labelIds`): `{7: "road", 26: "car", ...}`; a value mapped to `"background"` is 0,
      values not listed are `unlisted` (`"ignore"` -> 255, or `"background"` -> 0). Several values may share a name.

    `void` values become 255 in every case; any other value a label holds and the rule does not cover is an error
    naming the file.

    Args:
        root (`str` or `os.PathLike`): the dataset folder.
        layout (`str`, *optional*): `"camvid"` (`train/ trainannot/ val/ valannot/`) or `"cityscapes"`
            (`leftImg8bit/` + `gtFine/`); `None` detects it.

    Returns:
        `(source_names, samples)`.
    """
    root = Path(root)
    if layout is None:
        if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
            layout = "cityscapes"
        elif (root / "train").is_dir() and (root / "trainannot").is_dir():
            layout = "camvid"
        else:
            raise FileNotFoundError(
                f"{str(root)!r} has neither train/ + trainannot/ (CamVid layout) nor leftImg8bit/"
                " + gtFine/ (Cityscapes layout); give the dataset folder."
            )
    if (names is None) == (mapping is None):
        raise ValueError("give exactly one of names (classes by value) or mapping (value -> name).")
    void = [int(v) for v in void]
    if unlisted not in ("ignore", "background"):
        raise ValueError(f"unlisted={unlisted!r} is invalid; use 'ignore' (255) or 'background' (0).")
    table = np.full(256, -1, dtype=np.int16)
    if mapping is not None:
        mapping = {int(k): str(v) for k, v in mapping.items()}
        source_names = list(dict.fromkeys(v for k, v in sorted(mapping.items()) if v.lower() != "background"))
        table[:] = IGNORE_INDEX if unlisted == "ignore" else 0
        for value, name in mapping.items():
            table[value] = 0 if name.lower() == "background" else source_names.index(name) + 1
    else:
        source_names = [str(n) for n in names]
        offset = 0 if has_background else 1
        if has_background:
            table[0] = 0
        for k in range(len(source_names)):
            table[k + 1 - offset] = k + 1
    for v in void:
        if not 0 <= v <= 255:
            raise ValueError(f"void value {v} is not a label PNG value (0..255).")
        table[v] = IGNORE_INDEX
    table[IGNORE_INDEX] = IGNORE_INDEX if table[IGNORE_INDEX] < 0 else table[IGNORE_INDEX]
    pairs = _index_pairs(root, layout)

    def generate():
        for split, items in pairs.items():
            for image, mask in items:
                raw = read_mask(mask)
                label = table[raw]
                if (label < 0).any():
                    bad = sorted(int(v) for v in np.unique(raw[label < 0]))
                    raise ValueError(
                        f"label {str(mask)!r} holds values {bad} that are neither classes nor void; "
                        "declare their names or mark them void."
                    )
                stem = image.name[: -len("_leftImg8bit.png")] if layout == "cityscapes" else image.stem
                yield SourceSample(split, stem, image, label.astype(np.uint8), "raw")

    return source_names, generate()


# -- writer ---------------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split {split!r} is not written; use {list(_SPLITS)}.")


def _orientation(path: Path) -> int:
    with Image.open(path) as handle:
        return int(handle.getexif().get(_ORIENTATION_TAG, 1) or 1)


def _upright_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as handle:
        width, height = handle.size
        orientation = int(handle.getexif().get(_ORIENTATION_TAG, 1) or 1)
    return (width, height) if orientation in _SWAPS_SIDES else (height, width)


def _place_image(sample: SourceSample, folder: Path, image_id: str, shape: tuple[int, int]) -> None:
    src = sample.image_path
    orientation = _orientation(src)
    if orientation == 1 and src.suffix.lower() in IMAGE_EXTENSIONS:
        with Image.open(src) as handle:
            size = (handle.height, handle.width)
        _check_size(src, size, shape)
        shutil.copyfile(src, folder / f"{image_id}{src.suffix.lower()}")
        return
    # An EXIF rotation would be applied by some readers and not by others: store the frame the label uses, untagged.
    image = load_image(src, name=f"image {str(src)!r}") if sample.frame == "upright" else read_rgb(src)
    _check_size(src, (image.height, image.width), shape)
    image.save(folder / f"{image_id}.png")


def _check_size(src: Path, size: tuple[int, int], shape: tuple[int, int]) -> None:
    if size != tuple(shape):
        raise ValueError(
            f"image {str(src)!r} is {size[1]}x{size[0]} but its label is {shape[1]}x{shape[0]} (WxH); "
            "labels must have their image's size."
        )


def _default_num_folds(n: int) -> int:
    # PASCAL-5i style: 4 folds when there are enough classes, and always at least one base class per fold.
    return max(1, min(4, n - 1))


def write_folder_dataset(
    output_dir: str | os.PathLike,
    source_names: Sequence[str],
    samples: Iterable[SourceSample],
    classes: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
    unselected: str = "background",
    num_folds: int | None = None,
    folds: Sequence[Sequence[str]] | None = None,
    dataset_name: str | None = None,
    has_background: bool = True,
    source_format: str = "",
    overwrite: bool = False,
    progress: bool = False,
) -> ConversionResult:
    """
    Write source samples as a folder dataset (`images/`, `masks/`, `classes.json`, `train.txt`, `val.txt`).

    Args:
        output_dir (`str` or `os.PathLike`): the folder to create (must not exist, or be empty, unless `overwrite`).
        source_names (`Sequence[str]`): source class names (source id `k` is `source_names[k - 1]`).
        samples (`Iterable[SourceSample]`): from [`coco_samples`], [`yolo_samples`] or [`index_mask_samples`].
        classes, rename, unselected: class selection and renaming, see [`ClassMap.build`].
        num_folds (`int`, *optional*): split the classes into this many consecutive groups of novel classes.
        folds (`Sequence[Sequence[str]]`, *optional*): the novel classes (output names) of each fold; with neither,
            `num_folds = min(4, N - 1)`.
        dataset_name (`str`, *optional*): the `"dataset"` entry of `classes.json` (default: the folder name).
        has_background (`bool`, *optional*, defaults to `True`): recorded in `classes.json`; `False` says that
            value 0 never occurs (every labelled pixel is a class).
        source_format (`str`, *optional*): recorded in `classes.json`.
        overwrite (`bool`, *optional*, defaults to `False`): replace an existing non-empty folder.
        progress (`bool`, *optional*, defaults to `False`): a tqdm bar over the images.

    Returns:
        [`ConversionResult`]. A val split that is missing is a copy of the train list, and a val list holding the
        train images is reported in `warnings`: scores on it measure fitting, not generalisation.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output folder {str(output_dir)!r} is an existing file; give a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output folder {str(output_dir)!r} is not empty; give a new folder or overwrite=True (--overwrite)."
        )
    class_map = ClassMap.build(source_names, classes, rename, unselected)
    names = class_map.names
    if folds is not None and num_folds is not None:
        raise ValueError("give folds or num_folds, not both.")
    if folds is not None:
        folds = [[str(n) for n in fold] for fold in folds]
        unknown = sorted({n for fold in folds for n in fold if n not in names})
        if unknown:
            raise ValueError(
                f"folds name {unknown}, which are not output classes {list(names)}; use the names after renaming."
            )
        fold_entry = {"folds": folds}
    else:
        k = _default_num_folds(len(names)) if num_folds is None else int(num_folds)
        if not 1 <= k <= len(names):
            raise ValueError(f"num_folds={k} must be in 1..{len(names)} (the number of classes).")
        fold_entry = {"num_folds": k}

    warnings: list[str] = []
    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        lists: dict[str, list[str]] = {s: [] for s in _SPLITS}
        sources: dict[str, list[Path]] = {s: [] for s in _SPLITS}
        ids_of_source: dict[Path, str] = {}
        pixel_counts: dict[str, dict[int, int]] = {}
        if progress:
            from tqdm.auto import tqdm

            samples = tqdm(samples, desc="images")
        for sample in samples:
            _check_split(sample.split)
            source = sample.image_path.resolve()
            if source in ids_of_source:  # one image listed in both splits: written once, listed twice
                image_id = ids_of_source[source]
            else:
                image_id = sample.stem if sample.stem not in pixel_counts else f"{sample.split}_{sample.stem}"
                if image_id in pixel_counts:
                    raise ValueError(
                        f"two images are both named {sample.stem!r} (e.g. {str(source)!r}); give the "
                        "images distinct file names."
                    )
                label = class_map.apply(sample.label, where=f"label of {str(sample.image_path)!r}")
                _place_image(sample, tmp / "images", image_id, label.shape)
                Image.fromarray(label, "L").save(tmp / "masks" / f"{image_id}.png")
                values, counts = np.unique(label, return_counts=True)
                pixel_counts[image_id] = {int(v): int(c) for v, c in zip(values, counts)}
                ids_of_source[source] = image_id
            lists[sample.split].append(image_id)
            sources[sample.split].append(source)
        if not lists["train"] and not lists["val"]:
            raise ValueError("the source holds no image; check the folder and the split names.")
        for missing, other in (("val", "train"), ("train", "val")):
            if not lists[missing]:
                lists[missing] = list(lists[other])
                sources[missing] = list(sources[other])
        shared = set(sources["train"]) & set(sources["val"])
        if shared and set(sources["train"]) == set(sources["val"]):
            warnings.append(
                f"train and val lists are the same {len(shared)} images: scores on val will measure "
                "fitting, not generalisation; give a separate val split."
            )
        elif shared:
            warnings.append(
                f"{len(shared)} images are in both the train and the val list; scores on val are optimistic."
            )
        for split in _SPLITS:
            (tmp / f"{split}.txt").write_text("".join(f"{i}\n" for i in lists[split]))
        classes_json = {
            "names": list(names),
            **fold_entry,
            "dataset": dataset_name or output_dir.name,
            "has_background": bool(has_background),
            "conversion": {
                "format": source_format,
                "source_names": list(source_names),
                "renamed": class_map.renamed,
                "unselected": unselected,
            },
        }
        (tmp / "classes.json").write_text(json.dumps(classes_json, indent=2) + "\n")
        read_folder_classes(tmp)  # the fold table is valid for the folder builder
    for message in warnings:
        logger.warning(message)
    return ConversionResult(output_dir, names, lists["train"], lists["val"], pixel_counts, warnings)
