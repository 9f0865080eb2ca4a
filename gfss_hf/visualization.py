"""Pictures of label maps: a palette, colourised maps, overlays with a legend, and titled side-by-side panels.

Pure functions of numpy arrays and PIL images (no state, nothing written to disk), shared by `scripts/predict.py`,
the demo, the Space and the figures, so that a class has the same colour everywhere:

- id 0 (background) is black, id 255 (ignore) is white, ids 1..254 get distinct saturated colours;
- `colorize(label_map)` -> `(H, W, 3)` uint8; `palette_image(label_map)` -> a palette-mode PNG-ready image;
- `overlay(image, label_map, alpha)` blends the colours of the non-background pixels onto the image;
- `draw_legend(image, id2label, label_map)` adds a strip listing the classes present with their colours;
- `panels(images, titles)` puts images side by side under their titles.

Example:

```python
>>> import numpy as np
>>> from PIL import Image
>>> from gfss_hf.visualization import draw_legend, overlay
>>> image = Image.new("RGB", (64, 48), "gray")
>>> label_map = np.zeros((48, 64), dtype=np.int64)
>>> label_map[10:30, 20:40] = 1
>>> picture = draw_legend(overlay(image, label_map, alpha=0.5), {0: "background", 1: "zebra"}, label_map)
>>> picture.width > image.width  # the legend strip is on the right
True
```
"""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.splits import IGNORE_INDEX

__all__ = [
    "BACKGROUND_COLOR",
    "IGNORE_COLOR",
    "make_palette",
    "colorize",
    "palette_image",
    "overlay",
    "legend_entries",
    "draw_legend",
    "panels",
    "EpisodeRow",
    "episode_figure",
]

BACKGROUND_COLOR = (0, 0, 0)
IGNORE_COLOR = (255, 255, 255)
_GOLDEN = 0.6180339887498949


def make_palette() -> np.ndarray:
    """
    The colour of every label value.

    Returns:
        `np.ndarray` of shape `(256, 3)`, uint8: row 0 (background) black, row 255 (ignore) white, rows 1..254
        pairwise distinct colours, none of them close to black or white. Hues step by the golden ratio so that
        consecutive ids (the classes one sees together most often) are far apart on the colour wheel;
        saturation (period 2) and value (period 3) cycle so that ids whose hues come close again (8, 13, 21 apart)
        still differ.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(1, 255):
        hue = (index * _GOLDEN) % 1.0
        saturation = (0.95, 0.7)[index % 2]
        value = (0.95, 0.8, 0.62)[index % 3]
        palette[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    palette[0] = BACKGROUND_COLOR
    palette[IGNORE_INDEX] = IGNORE_COLOR
    return palette


_PALETTE = make_palette()
_PALETTE.setflags(write=False)


def _as_label_map(label_map, name: str = "label_map") -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    elif isinstance(label_map, Image.Image):
        if label_map.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{name} is a PIL image of mode {label_map.mode!r}; a label map holds class ids in one channel "
                "(mode 'L' or 'P'). Pass the ids, not a colour picture."
            )
        label_map = np.asarray(label_map)
    if not isinstance(label_map, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy array, a torch tensor or a PIL image, got {type(label_map).__name__}."
        )
    if label_map.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {label_map.shape}; pass one label map at a time.")
    if not (np.issubdtype(label_map.dtype, np.integer) or label_map.dtype == bool):
        raise ValueError(f"{name} must hold integer class ids, got dtype {label_map.dtype}; round or cast it first.")
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError(
            f"{name} holds values in [{label_map.min()}, {label_map.max()}]; class ids must be in 0..254 and "
            f"{IGNORE_INDEX} = ignore."
        )
    return label_map.astype(np.uint8)


def _as_rgb(image, name: str = "image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return Image.fromarray(image, "RGB")
    raise TypeError(
        f"{name} must be a PIL image or an (H, W, 3) uint8 array, got {type(image).__name__}"
        + (f" of shape {image.shape} and dtype {image.dtype}" if isinstance(image, np.ndarray) else "")
        + "; load files with gfss_hf.image_processing_gfss.load_image."
    )


def colorize(label_map) -> np.ndarray:
    """
    Colour a label map with the palette of [`make_palette`].

    Args:
        label_map (`np.ndarray`, `torch.Tensor` or `PIL.Image` of shape `(H, W)`): integer class ids, 0 background,
            255 ignore.

    Returns:
        `np.ndarray` of shape `(H, W, 3)`, uint8.

    Example:

    ```python
    >>> colorize(np.array([[0, 255]]))[0].tolist()
    [[0, 0, 0], [255, 255, 255]]
    ```
    """
    return _PALETTE[_as_label_map(label_map)]


def palette_image(label_map) -> Image.Image:
    """
    A palette-mode (`"P"`) PIL image of a label map: its pixels ARE the class ids (`np.asarray` gives them back,
    as the folder builder reads masks) and any viewer shows the palette's colours.

    Args:
        label_map (`np.ndarray`, `torch.Tensor` or `PIL.Image` of shape `(H, W)`): class ids in 0..255.
    """
    image = Image.fromarray(_as_label_map(label_map), mode="P")
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return image


def overlay(image, label_map, alpha: float = 0.5) -> Image.Image:
    """
    Blend the colours of a label map onto its image. Background pixels (0) are left as they are, so that the scene
    stays readable; every other id, ignore (white) included, is mixed as `(1 - alpha) * image + alpha * colour`.

    Args:
        image (`PIL.Image` or `np.ndarray` of shape `(H, W, 3)` uint8): the picture.
        label_map (`np.ndarray`, `torch.Tensor` or `PIL.Image` of shape `(H, W)`): class ids of the SAME size.
        alpha (`float`, *optional*, defaults to 0.5): opacity of the colours, in [0, 1].

    Returns:
        `PIL.Image` (RGB) of the image's size.
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be in [0, 1] (0: the image only, 1: the colours only).")
    rgb = _as_rgb(image)
    labels = _as_label_map(label_map)
    if labels.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"label_map is {labels.shape[1]}x{labels.shape[0]} but the image is {rgb.width}x{rgb.height} (WxH); "
            "predict at the image's original size or resize the map with NEAREST first."
        )
    pixels = np.asarray(rgb, dtype=np.float32)
    colours = _PALETTE[labels].astype(np.float32)
    blended = np.where((labels != 0)[..., None], (1.0 - alpha) * pixels + alpha * colours, pixels)
    return Image.fromarray(np.round(blended).astype(np.uint8), "RGB")


def legend_entries(id2label: Mapping[int, str] | Sequence[str], label_map=None) -> list[tuple[int, str, tuple]]:
    """
    The rows of a legend: `(id, name, (r, g, b))` for every class of `id2label`, or, when `label_map` is given, for
    every id present in it (ignore 255 as `"ignore"` when present), in id order.

    Args:
        id2label (`Mapping[int, str]` or `Sequence[str]`): class names by id (a list: `names[i]` is id `i`).
        label_map (`np.ndarray`, *optional*): restrict the rows to the ids present.
    """
    names = (
        dict(enumerate(id2label)) if not isinstance(id2label, Mapping) else {int(k): v for k, v in id2label.items()}
    )
    if label_map is None:
        ids = sorted(names)
    else:
        ids = sorted(int(i) for i in np.unique(_as_label_map(label_map)))
        unnamed = [i for i in ids if i not in names and i != IGNORE_INDEX]
        if unnamed:
            raise ValueError(
                f"label_map holds ids {unnamed} that id2label does not name (it names {sorted(names)}); pass the "
                "table the map was predicted with."
            )
    return [(i, str(names.get(i, "ignore")), tuple(int(c) for c in _PALETTE[i])) for i in ids]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_legend(
    image, id2label: Mapping[int, str] | Sequence[str], label_map=None, font_size: int | None = None
) -> Image.Image:
    """
    Add a legend strip to the right of an image: one colour swatch and name per class (see [`legend_entries`]).

    Args:
        image (`PIL.Image` or `np.ndarray` of shape `(H, W, 3)` uint8): the picture (e.g. from [`overlay`]).
        id2label (`Mapping[int, str]` or `Sequence[str]`): class names by id.
        label_map (`np.ndarray`, *optional*): list only the ids present in it.
        font_size (`int`, *optional*): text height in pixels (default: scaled to the image, 12..32).

    Returns:
        `PIL.Image` (RGB), as high as the image (taller when the rows do not fit) and wider by the strip.
    """
    rgb = _as_rgb(image)
    rows = legend_entries(id2label, label_map)
    size = font_size or int(np.clip(rgb.height / 24, 12, 32))
    font = _font(size)
    pad, swatch = max(size // 2, 4), size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max((probe.textbbox((0, 0), name, font=font)[2] for _, name, _ in rows), default=0)
    width = pad * 3 + swatch + text_width
    height = max(rgb.height, pad + len(rows) * (swatch + pad))
    canvas = Image.new("RGB", (rgb.width + width, height), (245, 245, 245))
    canvas.paste(rgb, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, (_, name, colour) in enumerate(rows):
        x, y = rgb.width + pad, pad + k * (swatch + pad)
        # A grey outline keeps the white (ignore) and black (background) swatches visible on the light strip.
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(128, 128, 128))
        draw.text((x + swatch + pad, y + swatch // 2), name, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


def panels(images: Sequence, titles: Sequence[str] | None = None, height: int | None = None) -> Image.Image:
    """
    Images side by side at one height, each under its title.

    Args:
        images (`Sequence` of `PIL.Image` or `(H, W, 3)` uint8 arrays): the panels, left to right.
        titles (`Sequence[str]`, *optional*): one title per image.
        height (`int`, *optional*): panel height in pixels (default: the smallest image height). Widths keep each
            image's aspect ratio.

    Returns:
        `PIL.Image` (RGB).
    """
    if len(images) == 0:
        raise ValueError("panels() needs at least one image.")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"got {len(images)} images but {len(titles)} titles; give one title per image (or none).")
    rgbs = [_as_rgb(image, f"images[{k}]") for k, image in enumerate(images)]
    height = int(height or min(im.height for im in rgbs))
    if height < 1:
        raise ValueError(f"height={height} must be >= 1.")
    resized = [im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR) for im in rgbs]
    size = int(np.clip(height / 16, 12, 28))
    font = _font(size)
    title_height = 2 * size if titles is not None else 0
    gap = max(size // 2, 4)
    width = sum(im.width for im in resized) + gap * (len(resized) - 1)
    canvas = Image.new("RGB", (width, height + title_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for k, im in enumerate(resized):
        canvas.paste(im, (x, title_height))
        if titles is not None:
            draw.text((x + im.width // 2, title_height // 2), str(titles[k]), fill=(0, 0, 0), font=font, anchor="mm")
        x += im.width + gap
    return canvas


class EpisodeRow(NamedTuple):
    """One episode of an [`episode_figure`]: the support with its novel-class mask (the class id on the class, 0
    elsewhere), the query, its ground truth and the predicted label maps (dataset ids), and the row's class name."""

    support_image: object
    support_mask: np.ndarray
    query_image: object
    truth: np.ndarray
    predictions: Sequence[np.ndarray]
    name: str


def episode_figure(
    rows: Sequence[EpisodeRow],
    id2label: Mapping[int, str] | Sequence[str],
    titles: Sequence[str] = ("support", "query", "ground truth", "FSS 2-way", "GFSS gamma=0", "GFSS gamma=10"),
    height: int = 180,
    font_size: int = 16,
) -> Image.Image:
    """
    The qualitative figure of few-shot episodes: one strip per episode (support with its mask laid over it, query,
    ground truth, then each prediction), the first title followed by the episode's class name, and a legend of every
    class the figure shows. The demo and the CamVid benchmark draw their figures with it.

    Args:
        rows (`Sequence[EpisodeRow]`): the episodes, top to bottom.
        id2label (`Mapping[int, str]` or `Sequence[str]`): names of the ids in the masks (ignore 255 may be absent).
        titles (`Sequence[str]`): one per panel: support, query, ground truth, then one per prediction.
        height (`int`, *optional*, defaults to 180): panel height in pixels.
        font_size (`int`, *optional*, defaults to 16): legend text height.

    Returns:
        `PIL.Image` (RGB).
    """
    if len(rows) == 0:
        raise ValueError("episode_figure() needs at least one episode row.")
    strips, shown = [], set()
    for row in rows:
        maps = [np.asarray(row.truth), np.asarray(row.support_mask), *[np.asarray(p) for p in row.predictions]]
        if len(titles) != 3 + len(row.predictions):
            raise ValueError(
                f"got {len(titles)} titles for {3 + len(row.predictions)} panels (support, query, ground truth and "
                f"{len(row.predictions)} predictions); give one title per panel."
            )
        images = [overlay(row.support_image, row.support_mask, alpha=0.6), row.query_image, colorize(row.truth)]
        images += [colorize(p) for p in row.predictions]
        shown.update(int(v) for m in maps for v in np.unique(m))
        strips.append(panels(images, [f"{titles[0]}: {row.name}", *titles[1:]], height=height))
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (255, 255, 255))
    y = 0
    for strip in strips:
        canvas.paste(strip, (0, y))
        y += strip.height
    return draw_legend(canvas, id2label, np.array([sorted(shown)]), font_size=font_size)
