"""Image processor of GFSS models: resize the longer side, pad to a square canvas, normalise; masks NEAREST with
ignore padding; post-processing back to each image's original size.

Pure PIL + numpy (no torchvision): results are the same on every machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

__all__ = [
    "POSTPROCESS_BAND_BYTES",
    "EncodedSupports",
    "GFSSImageProcessor",
    "check_support_background",
    "load_image",
    "load_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_SIDE = 16384
# Smallest canvas: the backbone's stride-8 features need at least one pixel.
MIN_IMAGE_SIZE = 8
_EXIF_ORIENTATION = 0x0112
# Post-processing resizes logits in row bands of at most this many bytes (float32, all classes), so that a huge query
# needs memory for its pixels times a few bytes, not for classes x pixels x 4 bytes (17 GB at 10000 x 10000).
POSTPROCESS_BAND_BYTES = 32 * 2**20

logger = logging.get_logger(__name__)


@dataclass
class EncodedSupports:
    r"""
    Support images and masks validated and preprocessed for adaptation (see
    [`GFSSImageProcessor.preprocess_supports`]); their features are the caller's to compute.

    Args:
        pixel_values (`torch.Tensor` of shape `(K, 3, S, S)`): the preprocessed support images.
        labels (`torch.Tensor` of shape `(K, S, S)`, int64): 0 background, `1..N` novel class, `ignore_index`
            ignored (padding too).
        annotated (`torch.Tensor` of shape `(K, N)`, bool): classes each support is annotated for.
        class_names (`list[str]`): the `N` classes, in row order.
    """

    pixel_values: torch.Tensor
    labels: torch.Tensor
    annotated: torch.Tensor
    class_names: list


def _binary_mask(mask: np.ndarray, index: int) -> np.ndarray:
    """0/1/255 (1 foreground) or 0/255 (white-on-black, 255 foreground) or bool -> int64 0/1/255."""
    values = set(np.unique(mask).tolist())
    if values <= {0, 1, 255}:
        if 1 not in values and 255 in values:
            return np.where(mask == 255, 1, 0).astype(np.int64)  # a white-on-black PNG
        return mask.astype(np.int64)
    shown = sorted(values - {0, 1, 255})[:6]
    raise ValueError(
        f"support_masks[{index}] has values {shown} besides 0/1/255; a binary mask holds 0 background and 1 "
        "foreground (255 = ignore), or 0 and 255 (a white-on-black PNG). Threshold soft or anti-aliased masks "
        "first, or pass mask_type='label_map' for maps of several classes."
    )


def _fold_name(name: str) -> str:
    return " ".join(name.split()).casefold()


def check_support_background(masks, class_names, support_class=None, ignore_index: int = 255, size=None) -> None:
    """
    Refuse a class whose supports hold no pixel of anything else: with only positive pixels, the fine-tuned row
    learns "everything is this class" and the whole query is labelled with it.

    Args:
        masks (`list[np.ndarray]`): one `HxW` integer mask per support: binary (0 background, 1 object,
            `ignore_index` ignored) when `support_class` is given, else label maps (0 background, `k` =
            `class_names[k - 1]`, `ignore_index` ignored).
        class_names (`list[str]`): the classes, for the message.
        support_class (`list[int]`, *optional*): the 0-based class of each binary mask; `None` for label maps.
        ignore_index (`int`, *optional*, defaults to 255): the ignored label.
        size (`tuple[int, int]`, *optional*): the canvas size when the masks have been resized (for the message).

    Raises:
        `ValueError`: naming the class, its supports and what a support mask must contain.
    """
    for n, name in enumerate(class_names):
        rows = [k for k in range(len(masks)) if support_class is None or support_class[k] == n]
        # Another class's pixels are negatives too in a label map; in a binary mask only 0 is.
        other = 1 if support_class is not None else n + 1
        if any(((np.asarray(masks[k]) != other) & (np.asarray(masks[k]) != ignore_index)).any() for k in rows):
            continue
        where = "" if size is None else f" after resizing to {size[1]}x{size[0]}"
        shown = ", ".join(f"support_masks[{k}]" for k in rows)
        raise ValueError(
            f"class {name!r}: no background pixel in any of its supports ({shown}){where}; every pixel is the object "
            "or ignored. A support mask must contain background (0; in a label map, 0 or another class) as well as "
            "the object (1, or 255 on a black mask): mark only the object, so the model also sees what the class "
            "is not."
        )


class GFSSImageProcessorKwargs(ImagesKwargs, total=False):
    image_size: int
    pad_mode: str
    ignore_index: int


def _describe(obj) -> str:
    return f"{type(obj).__name__}" + (f" of shape {tuple(obj.shape)}" if hasattr(obj, "shape") else "")


def _apply_orientation(image: Image.Image, name: str) -> Image.Image:
    """The pixels as a viewer shows them: phones store photos sideways with an EXIF Orientation tag, and a mask the
    user drew on the displayed photo only matches the rotated pixels. Idempotent (the tag is dropped on rotating)."""
    try:
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(image)
    except Exception as err:  # a malformed EXIF block must not make a readable image unusable; say so
        logger.warning(f"{name}: unreadable EXIF data ({err}); using the pixels as stored, without orientation.")
    return image


def load_image(image, name: str = "image", mode: str | None = "RGB", background=None) -> Image.Image:
    """
    Read one image: the single entry point for every image and mask file of the package, the Space and the scripts.

    Accepts a `PIL.Image` (any mode: grayscale, RGBA, palette, 16-bit are converted to 8-bit RGB), a path, or a numpy
    array / torch tensor (`HxW`, `HxWxC` or `CxHxW`; uint8, uint16, or float in [0, 1]). An EXIF orientation (phone
    photos) is applied, so the result is the image as viewers display it. Zero-size images, images with a side above
    16384 px, NaN / infinite floats and integer pixels outside [0, 255] are rejected.

    Args:
        image: the image (see above).
        name (`str`, *optional*, defaults to `"image"`): names the input in error messages.
        mode (`str`, *optional*, defaults to `"RGB"`): `"RGB"` converts to 8-bit RGB; `None` returns the (oriented)
            PIL image in its stored mode, for label maps and paint layers whose values matter (PIL or path only).
        background (*optional*): a PIL colour (e.g. `"white"`) for transparent pixels, as a browser shows them;
            `None` drops the alpha channel and keeps the stored colours.

    Returns:
        `PIL.Image.Image`.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: file {str(path)!r} does not exist.")
        try:
            with Image.open(path) as handle:
                handle.load()
                # Phone photos store their orientation as an EXIF tag: show and segment them the way viewers do.
                image = ImageOps.exif_transpose(handle)
        except Exception as err:
            raise ValueError(f"{name}: {str(path)!r} is not a readable image ({err}).") from err
    if isinstance(image, Image.Image):
        image = _apply_orientation(image, name)
        if mode is None:
            _check_size(image.height, image.width, name)
            return image
    elif mode is None:
        raise TypeError(f"{name}: expected a PIL image or a path, got {_describe(image)}.")
    if mode != "RGB":
        raise ValueError(f"mode={mode!r} is invalid; use 'RGB' or None (the stored mode).")
    if background is not None and isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, background), rgba).convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.transpose(1, 2, 0)
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"{name}: expected an HxW or HxWx3/4 array, got {_describe(array)}.")
        _check_size(array.shape[0], array.shape[1], name)
        if array.dtype == np.uint16:
            array = (array.astype(np.float32) / 257.0).round().astype(np.uint8)
        elif np.issubdtype(array.dtype, np.floating):
            # NaN passes a min/max range check and casts to an arbitrary byte: test it first.
            if not np.isfinite(array).all():
                raise ValueError(
                    f"{name}: float image holds {int((~np.isfinite(array)).sum())} NaN or infinite values; replace "
                    "them (e.g. np.nan_to_num) before segmenting."
                )
            if array.size and (array.min() < 0 or array.max() > 1):
                raise ValueError(
                    f"{name}: float images must be in [0, 1], got [{array.min():.3g}, {array.max():.3g}]; pass "
                    "uint8 pixels or rescale."
                )
            array = (array * 255.0).round().astype(np.uint8)
        elif array.dtype == bool or np.issubdtype(array.dtype, np.integer):
            # Clipping would silently turn -5 into black and 300 into white: out-of-range pixels are a caller bug.
            if array.dtype != np.uint8 and array.size and (array.min() < 0 or array.max() > 255):
                raise ValueError(
                    f"{name}: integer pixels must be in [0, 255] (or a uint16 array), got [{array.min()}, "
                    f"{array.max()}] ({array.dtype}); convert to uint8 or rescale."
                )
            array = array.astype(np.uint8)
        else:
            raise TypeError(f"{name}: unsupported pixel type {array.dtype}; pass uint8, uint16 or float in [0, 1].")
        if array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"{name}: expected a PIL image, a numpy array, a torch tensor or a path, got {_describe(image)}."
        )
    _check_size(image.height, image.width, name)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 257.0 if array.max() <= 65535 and image.mode != "I" else max(array.max() / 255.0, 1.0)
        return load_image((np.clip(array / scale, 0, 255)).round().astype(np.uint8), name)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def load_mask(mask, name: str = "mask") -> np.ndarray:
    """
    Read one label map as an `HxW` int64 array. Palette PNGs give their indices (VOC convention); RGB masks whose
    three channels are equal are read as one channel; a path is opened with PIL.
    """
    if isinstance(mask, (str, os.PathLike, Image.Image)):
        # The stored mode (palette indices, 16-bit labels), with the EXIF orientation of the image it was drawn on.
        mask = np.array(load_image(mask, name=name, mode=None))
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name}: expected a PIL image, numpy array, tensor or path, got {_describe(mask)}.")
    if mask.ndim == 3:
        if mask.shape[-1] == 1:
            mask = mask[..., 0]
        elif (
            mask.shape[-1] in (3, 4) and (mask[..., 0] == mask[..., 1]).all() and (mask[..., 0] == mask[..., 2]).all()
        ):
            mask = mask[..., 0]
        else:
            raise ValueError(
                f"{name}: expected a single-channel label map, got {_describe(mask)}; save masks as 'L' or palette PNGs "
                "holding class indices."
            )
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected an HxW label map, got {_describe(mask)}.")
    if mask.dtype == bool:
        mask = mask.astype(np.int64)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(mask == np.round(mask)):
            raise ValueError(f"{name}: label maps must hold integer class indices, got fractional values.")
    _check_size(mask.shape[0], mask.shape[1], name)
    return mask.astype(np.int64)


def _linear_weights(in_size: int, out_size: int, start: int, stop: int, device=None):
    """Source indices and weights of outputs `start .. stop - 1` of a bilinear resize `in_size -> out_size` along one
    axis (`align_corners=False`), as ATen computes them: the scale in float32, the source coordinate rounded to
    float32 (values agree with `F.interpolate` to one float32 rounding). Returns `(index0, index1, weight0, weight1)`.
    """
    scale = float(torch.tensor(in_size, dtype=torch.float32) / out_size)
    target = torch.arange(start, stop, dtype=torch.float64)
    source = (scale * (target + 0.5) - 0.5).to(torch.float32).clamp_min(0)
    index0 = source.floor().long().clamp(max=in_size - 1)
    weight1 = (source - index0.to(torch.float32)).clamp(0, 1)
    index1 = index0 + (index0 < in_size - 1).long()
    return index0.to(device), index1.to(device), (1 - weight1).to(device), weight1.to(device)


def _check_size(height: int, width: int, name: str) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{name} has size {width}x{height}; images must have at least one pixel.")
    if max(height, width) > MAX_IMAGE_SIDE:
        raise ValueError(
            f"{name} has size {width}x{height}, above the limit of {MAX_IMAGE_SIDE} px per side; downscale it first."
        )


class GFSSImageProcessor(BaseImageProcessor):
    r"""
    Prepares images (and label maps) for [`GFSSModel`].

    Images: converted to RGB, the longer side resized to `image_size` keeping the aspect ratio (bilinear), normalised
    with `image_mean` / `image_std`, and pasted top-left into an `image_size x image_size` canvas filled with the
    mean colour (`pad_mode="mean"`, this paper) or black (`pad_mode="zero"`, RePRI / DIaM). Label maps: resized
    NEAREST, padded with `ignore_index`, returned as int64 `labels`.

    Args:
        image_size (`int`, *optional*, defaults to 473): side of the square canvas.
        pad_mode (`str`, *optional*, defaults to `"mean"`): `"mean"` or `"zero"`.
        image_mean (`tuple[float]`, *optional*, defaults to ImageNet's): normalisation mean (0-1 scale).
        image_std (`tuple[float]`, *optional*, defaults to ImageNet's): normalisation std (0-1 scale).
        ignore_index (`int`, *optional*, defaults to 255): label of padded mask pixels.

    Example:

    ```python
    >>> from PIL import Image
    >>> from gfss_hf import GFSSImageProcessor
    >>> processor = GFSSImageProcessor(image_size=96)
    >>> batch = processor(Image.new("RGB", (120, 60)), return_tensors="pt")
    >>> batch["pixel_values"].shape, batch["resized_sizes"].tolist()
    (torch.Size([1, 3, 96, 96]), [[48, 96]])
    ```
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = GFSSImageProcessorKwargs

    def __init__(
        self,
        image_size: int = 473,
        pad_mode: str = "mean",
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        ignore_index: int = 255,
        **kwargs,
    ):
        kwargs.pop("image_processor_type", None)
        kwargs.pop("processor_class", None)
        auto_map = kwargs.pop("auto_map", None)
        if kwargs:
            raise TypeError(f"GFSSImageProcessor got unexpected arguments {sorted(kwargs)}.")
        super().__init__()
        self.auto_map = auto_map
        if int(image_size) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size={image_size} is too small; use at least {MIN_IMAGE_SIZE} (473 in the paper)."
            )
        if pad_mode not in ("mean", "zero"):
            raise ValueError(f"pad_mode={pad_mode!r} is invalid; allowed values are 'mean' and 'zero'.")
        self.image_size = int(image_size)
        self.pad_mode = pad_mode
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.ignore_index = int(ignore_index)
        self._valid_kwargs_names = []

    @classmethod
    def from_config(cls, config) -> GFSSImageProcessor:
        """The processor matching a [`GFSSConfig`]: its `image_size`, `pad_mode` and the backbone's normalisation
        (`image_mean` / `image_std`, ImageNet's when the config has none)."""
        mean = getattr(config, "image_mean", None)
        std = getattr(config, "image_std", None)
        return cls(
            image_size=config.image_size,
            pad_mode=config.pad_mode,
            image_mean=IMAGENET_MEAN if mean is None else mean,
            image_std=IMAGENET_STD if std is None else std,
            ignore_index=config.ignore_index,
        )

    def to_dict(self):
        output = {
            "image_size": self.image_size,
            "pad_mode": self.pad_mode,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "ignore_index": self.ignore_index,
            "image_processor_type": type(self).__name__,
        }
        auto_map = getattr(self, "auto_map", None)
        if auto_map:
            output["auto_map"] = auto_map
        return output

    # -- geometry ----------------------------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size `(h, w)` of an `height x width` image after resizing its longer side to `image_size`."""
        scale = self.image_size / max(height, width)
        return max(1, int(round(height * scale))), max(1, int(round(width * scale)))

    def _prepare_image(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        new_h, new_w = self.resized_size(image.height, image.width)
        if (new_h, new_w) != (image.height, image.width):
            image = image.resize((new_w, new_h), resample=Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        if self.pad_mode == "mean":
            fill = np.zeros(3, np.float32)  # the mean colour normalises to 0
        else:
            fill = -np.asarray(self.image_mean, np.float32) / np.asarray(self.image_std, np.float32)
        canvas = np.empty((self.image_size, self.image_size, 3), np.float32)
        canvas[...] = fill
        canvas[:new_h, :new_w] = array
        return canvas.transpose(2, 0, 1), (new_h, new_w)

    def _prepare_mask(self, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        new_h, new_w = size
        if mask.min() < 0 or mask.max() > 65535:
            raise ValueError(f"label values must be in [0, 65535], got [{mask.min()}, {mask.max()}].")
        if mask.shape != (new_h, new_w):
            mask = np.asarray(
                Image.fromarray(mask.astype(np.int32), mode="I").resize((new_w, new_h), resample=Image.NEAREST)
            )
        canvas = np.full((self.image_size, self.image_size), self.ignore_index, np.int64)
        canvas[:new_h, :new_w] = mask
        return canvas

    # -- supports of few-shot adaptation -----------------------------------------------------------------------
    def preprocess_supports(
        self,
        support_images,
        support_masks,
        class_names,
        mask_type: str = "binary",
        existing_class_names=(),
    ) -> EncodedSupports:
        r"""
        Validate user supports and preprocess them for adaptation. Every check raises an error that names the
        argument and the fix.

        Args:
            support_images (`list`): PIL images, numpy arrays, tensors or paths (any mode; see `load_image`).
            support_masks (`list`): one mask per image (PIL, numpy, tensor or path).
            class_names (`str` or `list[str]`): with `mask_type="binary"`, the class of each support (one name per
                image; a name may repeat for K shots of one class, a single string applies to all); with
                `mask_type="label_map"`, the classes of values `1..N` of the label maps.
            mask_type (`str`, *optional*, defaults to `"binary"`): `"binary"`: values {0, 1, 255} (1 foreground,
                255 ignored) or {0, 255} (a white-on-black PNG: 255 foreground), or bool; `"label_map"`:
                0 background, `k` = `class_names[k - 1]`, 255 ignored.
            existing_class_names (`list[str]`, *optional*): the model's classes; a new class may not repeat one
                (compared ignoring case and surrounding spaces).

        Returns:
            [`EncodedSupports`].

        Example:

        ```python
        >>> processor = GFSSImageProcessor(image_size=32)
        >>> mask = np.zeros((40, 40), np.uint8)
        >>> mask[10:20, 10:20] = 1
        >>> supports = processor.preprocess_supports([Image.new("RGB", (40, 40))], [mask], "my-object")
        >>> supports.labels.shape, supports.class_names
        (torch.Size([1, 32, 32]), ['my-object'])
        ```
        """
        if mask_type not in ("binary", "label_map"):
            raise ValueError(f"mask_type={mask_type!r} is invalid; use 'binary' or 'label_map'.")
        if support_images is None or (isinstance(support_images, (list, tuple)) and len(support_images) == 0):
            raise ValueError(
                "no support images: pass support_images=[...] and support_masks=[...] (at least one annotated image)."
            )
        images = list(support_images) if isinstance(support_images, (list, tuple)) else [support_images]
        if support_masks is None:
            raise ValueError("support_masks is missing; give one mask per support image.")
        masks = list(support_masks) if isinstance(support_masks, (list, tuple)) else [support_masks]
        if len(masks) != len(images):
            raise ValueError(
                f"got {len(images)} support_images but {len(masks)} support_masks; give exactly one mask per image."
            )
        if class_names is None:
            raise ValueError("class_names is missing; name the class of each support (binary) or of each label value.")
        names = [class_names] if isinstance(class_names, str) else list(class_names)
        if mask_type == "binary" and isinstance(class_names, str):
            names = names * len(images)
        for name in names:
            # str(None) would become a class called "None": a name must be given as text.
            if not isinstance(name, str):
                raise ValueError(
                    f"class_names holds {name!r} ({type(name).__name__}); every class name must be a non-empty string."
                )
        existing = list(existing_class_names)
        folded = {_fold_name(n): n for n in existing}
        for name in names:
            if not name.strip():
                raise ValueError(f"class_names holds an empty name {name!r}; give every class a non-empty name.")
            # "Dog " and "dog" would be two rows for one concept, and the new row would fight the pre-trained one.
            if _fold_name(name) in folded:
                raise ValueError(
                    f"class name {name!r} is already a class of the model ({folded[_fold_name(name)]!r}; names are "
                    f"compared ignoring case and surrounding spaces; classes: {existing}); the model segments it "
                    "already. Use another name for a new class."
                )
        if mask_type == "binary":
            if len(names) != len(images):
                raise ValueError(
                    f"got {len(images)} support_images but {len(names)} class_names; with binary masks give one class "
                    "name per support image (repeat a name for several shots of one class) or a single string."
                )
            unique = list(dict.fromkeys(names))  # first-appearance order
            support_class = [unique.index(n) for n in names]
        else:
            if len(set(names)) != len(names):
                repeated = sorted({n for n in names if names.count(n) > 1})
                raise ValueError(
                    f"class_names repeats {repeated}; with label maps each name is one label value (1..N), so names "
                    "must be unique."
                )
            if not names:
                raise ValueError("class_names is empty; name the classes of label values 1..N.")
            unique = names
            support_class = None
        pils, arrays = [], []
        for i, (image, mask) in enumerate(zip(images, masks)):
            pil = load_image(image, name=f"support_images[{i}]")
            array = load_mask(mask, name=f"support_masks[{i}]")
            if array.shape != (pil.height, pil.width):
                raise ValueError(
                    f"support_masks[{i}] has size {array.shape[1]}x{array.shape[0]} but support_images[{i}] is "
                    f"{pil.width}x{pil.height}; a mask must have the size of its image."
                )
            if mask_type == "binary":
                array = _binary_mask(array, i)
                if not (array == 1).any():
                    raise ValueError(
                        f"support_masks[{i}] has no foreground pixel; mark the object of class {names[i]!r} with 1 "
                        "(or 255 on a black mask)."
                    )
            else:
                bad = (array > len(names)) & (array != 255)
                if bad.any():
                    raise ValueError(
                        f"support_masks[{i}] holds label {int(array[bad][0])} but class_names has {len(names)} "
                        f"classes; label maps hold 0 background, 1..{len(names)} and 255 (ignore)."
                    )
                if not ((array >= 1) & (array != 255)).any():
                    raise ValueError(f"support_masks[{i}] has no foreground pixel (no label in 1..{len(names)}).")
            pils.append(pil)
            arrays.append(array)
        check_support_background(arrays, unique, support_class, ignore_index=255)
        batch = self(pils, segmentation_maps=arrays, return_tensors="pt")
        labels = batch["labels"].long()
        ignore = self.ignore_index
        size = tuple(labels.shape[-2:])
        for i in range(labels.shape[0]):
            if not ((labels[i] >= 1) & (labels[i] != ignore)).any():
                raise ValueError(
                    f"support_masks[{i}] has no foreground pixel left after resizing to {size[1]}x{size[0]}; give a "
                    "larger object (or a larger image_size)."
                )
        # Nearest resizing can drop the last background pixels of a nearly full mask: check again at the canvas size.
        check_support_background(list(labels.numpy()), unique, support_class, ignore_index=ignore, size=size)
        if support_class is not None:
            cls = torch.tensor(support_class)
            labels = torch.where(labels == 1, cls[:, None, None] + 1, labels)
            annotated = torch.nn.functional.one_hot(cls, len(unique)).bool()
        else:
            annotated = torch.ones(labels.shape[0], len(unique), dtype=torch.bool)
            present = {int(v) for v in np.unique(labels.numpy())} - {0, ignore}
            missing = [unique[k - 1] for k in range(1, len(unique) + 1) if k not in present]
            if missing:
                raise ValueError(
                    f"class_names {missing} have no pixel in any support label map; annotate them or drop the names."
                )
        return EncodedSupports(batch["pixel_values"], labels, annotated, unique)

    # -- main entry --------------------------------------------------------------------------------------------
    def __call__(self, images, segmentation_maps=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, segmentation_maps=segmentation_maps, **kwargs)

    def preprocess(self, images, segmentation_maps=None, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """
        Args:
            images: one image or a list (PIL, numpy, tensor or path; see `load_image`).
            segmentation_maps: optional label map(s) of the same sizes (see `load_mask`).
            return_tensors (`str`, *optional*, defaults to `"pt"`): `"pt"` or `"np"`.

        Returns:
            `BatchFeature` with `pixel_values` `(B, 3, S, S)` float32, `original_sizes` and `resized_sizes` `(B, 2)`
            int64 (height, width), and `labels` `(B, S, S)` int64 when masks are given.
        """
        if kwargs:
            raise TypeError(f"GFSSImageProcessor got unexpected arguments {sorted(kwargs)}.")
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        if not images:
            raise ValueError("images is empty; give at least one image.")
        masks = None
        if segmentation_maps is not None:
            masks = (
                [segmentation_maps] if not isinstance(segmentation_maps, (list, tuple)) else list(segmentation_maps)
            )
            if len(masks) != len(images):
                raise ValueError(f"got {len(images)} images but {len(masks)} segmentation maps; give one per image.")
        pixel_values, labels, original_sizes, resized_sizes = [], [], [], []
        for i, image in enumerate(images):
            pil = load_image(image, name=f"image {i}")
            array, size = self._prepare_image(pil)
            pixel_values.append(array)
            original_sizes.append((pil.height, pil.width))
            resized_sizes.append(size)
            if masks is not None:
                mask = load_mask(masks[i], name=f"segmentation map {i}")
                if mask.shape != (pil.height, pil.width):
                    raise ValueError(
                        f"segmentation map {i} has size {mask.shape[1]}x{mask.shape[0]} but its image has "
                        f"{pil.width}x{pil.height}; masks must have the size of their image."
                    )
                labels.append(self._prepare_mask(mask, size))
        data = {
            "pixel_values": np.stack(pixel_values),
            "original_sizes": np.asarray(original_sizes, np.int64),
            "resized_sizes": np.asarray(resized_sizes, np.int64),
        }
        if masks is not None:
            data["labels"] = np.stack(labels)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # -- post-processing ---------------------------------------------------------------------------------------
    def resized_logit_bands(self, logits: torch.Tensor, target_size, band_rows: int | None = None):
        """
        Undo pad and resize on one image's canvas logits, band of rows by band of rows: crop the valid region and
        resize it bilinearly (`align_corners=False`) to the original size. Each band is computed on its own from the
        low-resolution crop, with the same per-pixel arithmetic whatever the band height, so any banding gives the
        same values; a pass over the bands needs memory for one band, not for `C x height x width` floats.

        Args:
            logits (`torch.Tensor` of shape `(C, S, S)` or `(C, h, w)`): one image's canvas logits (any resolution
                that is a scaling of the canvas).
            target_size (`tuple[int, int]`): its original `(height, width)`.
            band_rows (`int`, *optional*): rows per band; by default as many as fit in `POSTPROCESS_BAND_BYTES`.

        Yields:
            `(row, band)`: the first output row of the band and the band, `(C, rows, width)` float32.
        """
        height, width = int(target_size[0]), int(target_size[1])
        scale = logits.shape[-1] / self.image_size
        new_h, new_w = self.resized_size(height, width)
        crop_h = max(1, int(round(new_h * scale)))
        crop_w = max(1, int(round(new_w * scale)))
        crop = logits[:, :crop_h, :crop_w].float()
        channels = crop.shape[0]
        if band_rows is None:
            band_rows = POSTPROCESS_BAND_BYTES // max(1, 4 * channels * width)
        band_rows = max(1, int(band_rows))
        for start in range(0, height, band_rows):
            stop = min(height, start + band_rows)
            row0, row1, row_w0, row_w1 = _linear_weights(crop_h, height, start, stop, crop.device)
            low, high = int(row0[0]), int(row1[-1]) + 1  # the source rows this band reads (indices are monotonic)
            # Along the width, ATen's kernel on the band's source rows (the height is unchanged, which copies rows
            # exactly); along the height, the two-row blend with ATen's weights, in separate multiplications and one
            # addition so that no fused multiply-add makes a pixel depend on where the band starts.
            columns = F.interpolate(
                crop[None, :, low:high], size=(high - low, width), mode="bilinear", align_corners=False
            )[0]
            band = columns.index_select(1, row0 - low).mul_(row_w0[:, None])
            yield start, band.add_(columns.index_select(1, row1 - low).mul_(row_w1[:, None]))

    def post_process_logits(self, logits: torch.Tensor, target_sizes) -> list[torch.Tensor]:
        """
        Undo pad and resize on canvas logits: crop each image's valid region and resize it bilinearly to its
        original size (see [`~GFSSImageProcessor.resized_logit_bands`]).

        This returns every class's logits at full resolution (`C x height x width` float32 per image): for label
        maps of large images use [`~GFSSImageProcessor.post_process_semantic_segmentation`], which works band by
        band.

        Args:
            logits (`torch.Tensor` of shape `(B, C, S, S)` or `(B, C, h, w)`): canvas logits (any resolution that
                is a scaling of the canvas).
            target_sizes (`list[tuple[int, int]]`): original `(height, width)` per image.

        Returns:
            `list[torch.Tensor]`, each `(C, height, width)`.
        """
        if len(target_sizes) != logits.shape[0]:
            raise ValueError(f"got {logits.shape[0]} logits but {len(target_sizes)} target sizes.")
        out = []
        for i, (height, width) in enumerate(target_sizes):
            full = torch.empty((logits.shape[1], int(height), int(width)), dtype=torch.float32, device=logits.device)
            for row, band in self.resized_logit_bands(logits[i], (height, width)):
                full[:, row : row + band.shape[1]] = band
            out.append(full)
        return out

    def post_process_semantic_segmentation(self, outputs, target_sizes=None) -> list[torch.Tensor]:
        """
        Label maps at each image's original size.

        Args:
            outputs: a [`GFSSModelOutput`] (or anything with `.logits`), or a logits tensor `(B, C, S, S)`.
            target_sizes (`list[tuple[int, int]]` or tensor `(B, 2)`, *optional*): original `(height, width)` per
                image (the `original_sizes` returned by the processor). Without it, canvas-size maps are returned.

        Returns:
            `list[torch.Tensor]` of int64 `(height, width)` label maps (classifier rows).
        """
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if len(target_sizes) != logits.shape[0]:
            raise ValueError(f"got {logits.shape[0]} logits but {len(target_sizes)} target sizes.")
        out = []
        for i, (height, width) in enumerate(target_sizes):
            label_map = torch.empty((int(height), int(width)), dtype=torch.int64, device=logits.device)
            for row, band in self.resized_logit_bands(logits[i], (height, width)):
                label_map[row : row + band.shape[1]] = band.argmax(dim=0)
            out.append(label_map)
        return out
