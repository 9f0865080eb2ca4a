"""The embedded procedural GFSS dataset: no download, deterministic from a seed, a few seconds per 1,000 images.

Each of the 20 object classes is a (shape, texture) pair: 5 shapes (circle, square, triangle, cross, star) x 4
textures (plain, striped, checkered, dotted). Colours, sizes, rotations and texture periods are random, so neither
colour nor scale identifies a class; the objects (1-4 per image, later ones occluding earlier ones) sit on a
cluttered background of smooth colour fields, lines, and elongated textured blobs. Fold f of the fold table
(`gfss_hf.data.splits.synthetic_novel_ids`) holds out one texture per shape, so every novel class is an unseen
pairing of a shape and a texture that the base classes do show.

Image `index` of seed `seed` is rendered by `render_sample(seed, index, image_size)` with its own
`np.random.default_rng([seed, index])`: the same (seed, index, image_size) gives identical bytes on every run. The
train split uses indices `0..num_train-1`, the val split `VAL_INDEX_OFFSET + i`; an image id (`"train-000012"`,
`"val-000003"`) therefore determines the picture.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image
from transformers.utils import logging

from ._builder import GFSSBuilderMixin
from .episodes import class_index_from_pixel_counts, compute_pixel_counts
from .splits import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_IMAGE_SIZE,
    SYNTHETIC_MIN_PIXELS,
    SYNTHETIC_SHAPES,
    SYNTHETIC_TEXTURES,
    FoldSplit,
    get_split,
)

logger = logging.get_logger(__name__)

__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_SHAPES",
    "SYNTHETIC_TEXTURES",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_MIN_PIXELS",
    "DIAM_MIN_SUPPORT_PIXELS",
    "VAL_INDEX_OFFSET",
    "render_sample",
    "synthetic_image_id",
    "parse_synthetic_id",
    "SyntheticSegmentation",
    "SyntheticGFSSConfig",
    "SyntheticGFSS",
]

DEFAULT_IMAGE_SIZE = SYNTHETIC_IMAGE_SIZE
DEFAULT_MIN_PIXELS = SYNTHETIC_MIN_PIXELS  # why 64 px: see gfss_hf/data/splits.py
# Support area threshold of the `diam` protocol on 96x96 images. DIaM's 16,384 px is 9.4 % of a 417x417 canvas
# (868 px at 96x96), more than the smaller objects here ever cover (areas ~2.1-3.1 r^2, r in 11..21 px); 512 px
# keeps the "large, clearly visible support object" intent. Scale it with the image area for other sizes.
DIAM_MIN_SUPPORT_PIXELS = 512
VAL_INDEX_OFFSET = 1_000_000
_SPLITS = ("train", "val")
_REFERENCE_SIZE = 96.0


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3).astype(np.float32)


def _contrasting_colour(rng: np.random.Generator, colour: np.ndarray, min_diff: float = 70.0) -> np.ndarray:
    """A random colour whose mean intensity differs from `colour` by at least `min_diff`."""
    other = _random_colour(rng)
    diff = float(other.mean() - colour.mean())
    if abs(diff) < min_diff:
        # Push the whole colour away from the reference, towards whichever side has room.
        direction = 1.0 if colour.mean() < 128 else -1.0
        other = np.clip(colour + direction * rng.uniform(min_diff, min_diff + 60), 0, 255).astype(np.float32)
    return other


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of shape `shape` with size `r` in object coordinates (u, v) centred on the object."""
    name = SYNTHETIC_SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        a = 0.82 * r
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if name == "triangle":
        # Equilateral triangle with circumradius 1.36 r (inside all three edges; inradius = half the circumradius),
        # so that its area (2.4 r^2) is close to the other shapes'.
        inradius = 0.68 * r
        mask = np.ones(u.shape, dtype=bool)
        for k in range(3):
            ang = np.pi / 2 + 2 * np.pi * k / 3
            mask &= u * np.cos(ang) + v * np.sin(ang) <= inradius
        return mask
    if name == "cross":
        w = 0.34 * r
        au, av = np.abs(u), np.abs(v)
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    if name == "star":
        rho = np.sqrt(u * u + v * v)
        phi = np.arctan2(v, u)
        # Triangle wave over the angle: 1 at the 5 tips, 0 halfway between them.
        t = np.abs(np.mod(phi * 5 / (2 * np.pi) + 0.5, 1.0) - 0.5) * 2
        return rho <= r * (0.5 + 0.75 * (1 - t) ** 1.6)
    raise AssertionError(f"unknown shape index {shape}")


def _texture_pattern(texture: int, a: np.ndarray, b: np.ndarray, period: float) -> np.ndarray:
    """Boolean 'second colour' pattern of texture `texture` in texture coordinates (a, b)."""
    name = SYNTHETIC_TEXTURES[texture]
    if name == "plain":
        return np.zeros(a.shape, dtype=bool)
    if name == "striped":
        return np.floor(a / period) % 2 == 1
    if name == "checkered":
        return (np.floor(a / period) + np.floor(b / period)) % 2 == 1
    if name == "dotted":
        p = period * 1.5
        da = np.mod(a, p) - p / 2
        db = np.mod(b, p) - p / 2
        return da * da + db * db <= (0.3 * p) ** 2
    raise AssertionError(f"unknown texture index {texture}")


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def _background(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    yy, xx = _grid(size)
    # Smooth two-colour field from a few random plane waves.
    field = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.5, 3.0) * 2 * np.pi / size
        field += np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    field = (field - field.min()) / max(float(field.max() - field.min()), 1e-6)
    c1, c2 = _random_colour(rng), _random_colour(rng)
    img = c1 * (1 - field[..., None]) + c2 * field[..., None]

    # Clutter: lines, plain blobs, and now and then an elongated blob with an object texture (so that texture alone
    # does not mean "object") or a patch of wavy stripes. Kept sparse: with more textured clutter, a small network
    # pre-trained for a few CPU minutes stays stuck predicting background everywhere.
    for _ in range(int(rng.integers(2, 6))):
        kind = int(rng.choice(4, p=(0.4, 0.35, 0.1, 0.15)))
        colour = _random_colour(rng)
        alpha = rng.uniform(0.5, 1.0)
        cx, cy = rng.uniform(0, size, size=2)
        angle = rng.uniform(0, np.pi)
        if kind == 0:  # a thin line segment
            ra, rb = rng.uniform(7.5, 30) * scale, rng.uniform(0.6, 1.8) * scale
        elif kind == 1:  # a plain elongated blob
            ra, rb = rng.uniform(6, 16) * scale, rng.uniform(2, 6) * scale
        elif kind == 2:  # an elongated blob with an object texture
            ra, rb = rng.uniform(10, 22) * scale, rng.uniform(3, 6) * scale
        else:  # an irregular patch with wavy stripes: a texture no class uses
            ra, rb = rng.uniform(8, 20) * scale, rng.uniform(6, 14) * scale
        # Work inside the element's bounding box only.
        y0, y1 = max(int(cy - ra - 1), 0), min(int(cy + ra) + 2, size)
        x0, x1 = max(int(cx - ra - 1), 0), min(int(cx + ra) + 2, size)
        if y0 >= y1 or x0 >= x1:
            continue
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u, v = _rotate(dx, dy, angle)
        if kind == 0:
            mask = (np.abs(v) <= rb) & (np.abs(u) <= ra)
        else:
            mask = (u / ra) ** 2 + (v / rb) ** 2 <= 1
        if kind == 2:
            ta, tb = _rotate(dx, dy, rng.uniform(0, np.pi))
            pattern = _texture_pattern(int(rng.integers(1, 4)), ta, tb, rng.uniform(3, 6) * scale)
            paint = np.where(pattern[..., None], _contrasting_colour(rng, colour), colour)
        elif kind == 3:
            wave = np.sin(u / (2 * scale) + 2.5 * np.sin(v / (3 * scale))) > 0
            paint = np.where(wave[..., None], _contrasting_colour(rng, colour), colour)
        else:
            paint = colour
        window = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = np.where(mask[..., None], (1 - alpha) * window + alpha * paint, window)
    return img


def render_sample(
    seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE, max_objects: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Render one image of the procedural dataset.

    Args:
        seed (`int`): dataset seed.
        index (`int`): image index; the random stream is `np.random.default_rng([seed, index])`.
        image_size (`int`, *optional*, defaults to 96): side of the square image in pixels. Object sizes and
            texture periods scale with it.
        max_objects (`int`, *optional*, defaults to 4): each image holds 1..`max_objects` objects.

    Returns:
        `tuple(np.ndarray, np.ndarray)`: the image, `uint8` of shape `(image_size, image_size, 3)`, and the label,
        `uint8` of shape `(image_size, image_size)` with 0 background and class ids 1..20 (`SYNTHETIC_CLASSES`).

    Example:

    ```python
    >>> image, label = render_sample(0, 7)
    >>> image.shape, label.shape, image.dtype
    ((96, 96, 3), (96, 96), dtype('uint8'))
    ```
    """
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for the objects to stay recognisable; use >= 32.")
    if max_objects < 1:
        raise ValueError(f"max_objects={max_objects} must be >= 1.")
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed} and index={index} must be non-negative integers.")
    size = int(image_size)
    scale = size / _REFERENCE_SIZE
    rng = np.random.default_rng([int(seed), int(index)])
    yy, xx = _grid(size)
    img = _background(rng, size, scale)
    label = np.zeros((size, size), dtype=np.uint8)

    n_tex = len(SYNTHETIC_TEXTURES)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        class_id = int(rng.integers(1, len(SYNTHETIC_CLASSES) + 1))
        shape, texture = divmod(class_id - 1, n_tex)
        r = rng.uniform(11, 21) * scale
        cx, cy = rng.uniform(0.12 * size, 0.88 * size, size=2)
        # Work inside the object's bounding box only.
        pad = 1.25 * r + 1
        y0, y1 = max(int(cy - pad), 0), min(int(cy + pad) + 1, size)
        x0, x1 = max(int(cx - pad), 0), min(int(cx + pad) + 1, size)
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u, v = _rotate(dx, dy, rng.uniform(0, 2 * np.pi))
        mask = _shape_mask(shape, u, v, r)
        ta, tb = _rotate(dx, dy, rng.uniform(0, np.pi))
        pattern = _texture_pattern(texture, ta, tb, rng.uniform(3.5, 6.5) * scale)
        colour = _random_colour(rng)
        other = _contrasting_colour(rng, colour)
        # A mild linear shading so that even plain objects are not perfectly flat.
        gu, _ = _rotate(dx, dy, rng.uniform(0, 2 * np.pi))
        shading = 1.0 + rng.uniform(0.0, 0.25) * gu / r
        paint = np.where(pattern[..., None], other, colour) * shading[..., None]
        img[y0:y1, x0:x1] = np.where(mask[..., None], paint, img[y0:y1, x0:x1])
        label[y0:y1, x0:x1][mask] = class_id

    img = img + rng.normal(0.0, rng.uniform(3.0, 10.0), size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label


def synthetic_image_id(split: str, i: int) -> str:
    """Id of image `i` of `split` (`"train"` or `"val"`), e.g. `"train-000012"`."""
    _check_split(split)
    return f"{split}-{int(i):06d}"


def parse_synthetic_id(image_id: str) -> int:
    """Global render index of a synthetic image id (`"val-000003"` -> `VAL_INDEX_OFFSET + 3`)."""
    split, _, num = str(image_id).partition("-")
    if split not in _SPLITS or not num.isdigit():
        raise ValueError(f"{image_id!r} is not a synthetic image id; expected 'train-NNNNNN' or 'val-NNNNNN'.")
    return int(num) + (VAL_INDEX_OFFSET if split == "val" else 0)


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not a synthetic split; use one of {list(_SPLITS)}.")


class SyntheticSegmentation:
    """In-memory access to the procedural dataset, without the Arrow round trip (for fast training/evaluation).

    Images are rendered on first access and kept in memory (1,000 images of 96x96 take ~37 MB).

    Args:
        split (`str`, *optional*, defaults to `"train"`): `"train"` or `"val"` (disjoint render indices).
        num_images (`int`, *optional*, defaults to 1000): number of images of the split.
        image_size (`int`, *optional*, defaults to 96): side in pixels.
        seed (`int`, *optional*, defaults to 0): dataset seed.
        fold (`int`, *optional*): with `view="base_train"`, the fold whose novel classes are removed.
        view (`str`, *optional*, defaults to `"full"`): `"full"` gives dataset ids 0..20; `"base_train"` keeps only
            images with a base class of >= `min_pixels` pixels and remaps labels with
            `FoldSplit.to_base_training`.
        min_pixels (`int`, *optional*, defaults to 64): area threshold of the base-training filter.
        novel_to_background (`bool`, *optional*, defaults to `False`): in `"base_train"`, label novel pixels 0
            instead of 255.
        return_pil (`bool`, *optional*, defaults to `False`): return PIL images (RGB / mode "L") instead of arrays.

    Example:

    ```python
    >>> ds = SyntheticSegmentation("val", num_images=8)
    >>> sample = ds[0]
    >>> sample["id"], sample["image"].shape, sample["label"].shape
    ('val-000000', (96, 96, 3), (96, 96))
    ```
    """

    def __init__(
        self,
        split: str = "train",
        num_images: int = 1000,
        image_size: int = DEFAULT_IMAGE_SIZE,
        seed: int = 0,
        fold: int | None = None,
        view: str = "full",
        min_pixels: int = DEFAULT_MIN_PIXELS,
        novel_to_background: bool = False,
        return_pil: bool = False,
    ):
        _check_split(split)
        if num_images < 1:
            raise ValueError(f"num_images={num_images} must be >= 1.")
        if view not in ("full", "base_train"):
            raise ValueError(f"view={view!r} is not known; use 'full' or 'base_train'.")
        if view == "base_train" and fold is None:
            raise ValueError("view='base_train' needs a fold (0-3) to know which classes are novel; pass fold=.")
        self.split = split
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.view = view
        self.min_pixels = int(min_pixels)
        self.novel_to_background = novel_to_background
        self.return_pil = return_pil
        self.fold_split: FoldSplit | None = get_split("synthetic", fold) if fold is not None else None
        self._offset = VAL_INDEX_OFFSET if split == "val" else 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        local = list(range(int(num_images)))
        if view == "base_train":
            base = set(self.fold_split.base_ids)
            keep = []
            for i in local:
                counts = np.bincount(self._render(i)[1].ravel(), minlength=256)
                if any(counts[c] >= self.min_pixels for c in base):
                    keep.append(i)
            logger.info(f"synthetic base_train view: kept {len(keep)} of {len(local)} images")
            local = keep
        self._local = local
        self.ids = [synthetic_image_id(split, i) for i in local]

    def _render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            self._cache[i] = render_sample(self.seed, self._offset + i, self.image_size)
        return self._cache[i]

    def __len__(self) -> int:
        return len(self._local)

    def __getitem__(self, idx: int) -> dict:
        if not -len(self) <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} images")
        i = self._local[idx]
        image, label = self._render(i)
        if self.view == "base_train":
            label = self.fold_split.to_base_training(label, novel_to_background=self.novel_to_background)
        if self.return_pil:
            return {"id": self.ids[idx], "image": Image.fromarray(image, "RGB"), "label": Image.fromarray(label, "L")}
        return {"id": self.ids[idx], "image": image, "label": label}

    def __iter__(self) -> Iterator[dict]:
        for idx in range(len(self)):
            yield self[idx]

    def get_by_id(self, image_id: str) -> dict:
        """The sample of id `image_id` (any id of this split, also outside `num_images`)."""
        index = parse_synthetic_id(image_id)
        if (index >= VAL_INDEX_OFFSET) != (self.split == "val"):
            raise ValueError(f"{image_id!r} does not belong to split {self.split!r}.")
        image, label = self._render(index - self._offset)
        if self.view == "base_train":
            label = self.fold_split.to_base_training(label, novel_to_background=self.novel_to_background)
        return {"id": image_id, "image": image, "label": label}

    def pixel_counts(self) -> dict[str, dict[int, int]]:
        """Per image id, the pixel count of every class present (dataset ids, full labels)."""
        return compute_pixel_counts((synthetic_image_id(self.split, i), self._render(i)[1]) for i in self._local)

    def class_index(self, min_pixels: int | None = None) -> dict[int, list[str]]:
        """Class id -> sorted image ids where the class covers >= `min_pixels` pixels (default: `self.min_pixels`)."""
        threshold = self.min_pixels if min_pixels is None else int(min_pixels)
        return class_index_from_pixel_counts(self.pixel_counts(), threshold, class_ids=range(1, 21))


@dataclass
class SyntheticGFSSConfig(datasets.BuilderConfig):
    """Configuration of [`SyntheticGFSS`].

    Args:
        num_train (`int`, defaults to 1000): images of the train split.
        num_val (`int`, defaults to 200): images of the val split.
        image_size (`int`, defaults to 96): side in pixels.
        seed (`int`, defaults to 0): dataset seed.
        fold (`int`, defaults to 0): fold (0-3) used by the `"base_train"` view.
        view (`str`, defaults to `"base_train"`): `"base_train"` (train images with a base class of >= `min_pixels`
            px, labels remapped to base-training ids), `"train"` (all train images, dataset ids) or `"val"` (all val
            images, dataset ids).
        min_pixels (`int`, defaults to 64): area threshold of the base-training filter.
        novel_to_background (`bool`, defaults to `False`): in `"base_train"`, novel pixels -> 0 instead of 255.
    """

    num_train: int = 1000
    num_val: int = 200
    image_size: int = DEFAULT_IMAGE_SIZE
    seed: int = 0
    fold: int = 0
    view: str = "base_train"
    min_pixels: int = DEFAULT_MIN_PIXELS
    novel_to_background: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.view not in ("base_train", "train", "val"):
            raise ValueError(f"view={self.view!r} is not known; use 'base_train', 'train' or 'val'.")
        get_split("synthetic", self.fold)  # validates the fold


class SyntheticGFSS(GFSSBuilderMixin, datasets.GeneratorBasedBuilder):
    """`datasets` builder of the procedural dataset (self-contained cache: images are stored as PNG bytes).

    Example:

    ```python
    >>> builder = SyntheticGFSS(cache_dir="/tmp/cache", num_train=64, view="base_train", fold=0)
    >>> builder.download_and_prepare()
    >>> ds = builder.as_dataset(split="train")
    ```
    Keyword arguments are the fields of [`SyntheticGFSSConfig`]; `SyntheticGFSS.from_config(config, cache_dir)`
    takes a config instance.
    """

    BUILDER_CONFIG_CLASS = SyntheticGFSSConfig
    VERSION = datasets.Version("1.0.0")
    DESCRIPTION = "Procedural shapes x textures GFSS dataset (gfss_hf)."

    @property
    def fold_split(self) -> FoldSplit:
        return get_split("synthetic", self.config.fold)

    def _split_generators(self, dl_manager):
        cfg = self.config
        if cfg.view == "val":
            return [datasets.SplitGenerator(name=datasets.Split.VALIDATION, gen_kwargs={"split": "val"})]
        return [datasets.SplitGenerator(name=datasets.Split.TRAIN, gen_kwargs={"split": "train"})]

    def _generate_examples(self, split: str):
        cfg = self.config
        base_view = cfg.view == "base_train"
        data = SyntheticSegmentation(
            split,
            num_images=cfg.num_train if split == "train" else cfg.num_val,
            image_size=cfg.image_size,
            seed=cfg.seed,
            fold=cfg.fold if base_view else None,
            view="base_train" if base_view else "full",
            min_pixels=cfg.min_pixels,
            novel_to_background=cfg.novel_to_background,
            return_pil=True,
        )
        yield from enumerate(data)
