"""Configuration of GFSS models (PSPNet on a timm backbone with an expandable classifier)."""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

__all__ = ["GFSSConfig"]

_FEATURE_SOURCES = ("decoder", "backbone")
_DILATION_STYLES = ("timm", "pspnet")
_PAD_MODES = ("mean", "zero")


class GFSSConfig(PreTrainedConfig):
    r"""
    Configuration of a [`GFSSModel`]: a timm ResNet backbone dilated to output stride 8, a pyramid pooling
    decoder (PSPNet) and a 1x1 classifier whose rows are `[background, base_1..base_B, novel_1..novel_N]`.

    The label set is the single source of truth for the classifier size: `id2label` is always derived from
    `background_name`, `base_class_names` and `novel_class_names`, in that order.

    Args:
        backbone (`str`, *optional*, defaults to `"resnet50s"`):
            timm model name. `resnet50s` is the ResNet-50 with the 3-conv deep stem (64-64-128) used by PSPNet.
        output_stride (`int`, *optional*, defaults to 8):
            Output stride of the backbone (8, 16 or 32); 8 dilates layer3 and layer4. `None` keeps the backbone's
            native stride, which is the only choice for a ViT (its stride is its patch size, e.g. 14 for DINOv2).
        dilation_style (`str`, *optional*, defaults to `"timm"`):
            `"timm"` keeps timm's dilation; `"pspnet"` also dilates the first block of each dilated stage, as every
            released PSPNet checkpoint expects (set by the checkpoint converter).
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"channels": [32, 64, 128, 256]}` for tiny tests).
        pool_scales (`tuple[int]`, *optional*, defaults to `(1, 2, 3, 6)`):
            Bins of the pyramid pooling module.
        ppm_align_corners (`bool`, *optional*, defaults to `True`):
            `align_corners` of the bilinear upsampling inside the pyramid pooling module.
        hidden_size (`int`, *optional*, defaults to 512):
            Channels D of the dense feature fed to the classifier.
        dropout (`float`, *optional*, defaults to 0.1):
            Dropout2d probability after the bottleneck.
        classifier_bias (`bool`, *optional*, defaults to `False`):
            Whether the 1x1 classifier has a bias (off in the reference; on for some converted checkpoints).
        logits_align_corners (`bool`, *optional*, defaults to `True`):
            `align_corners` of the bilinear upsampling of the logits to the input size.
        image_size (`int`, *optional*, defaults to 473):
            Side of the square canvas images are resized and padded to.
        pad_mode (`str`, *optional*, defaults to `"mean"`):
            `"mean"` pads the canvas with the mean colour (this paper); `"zero"` with black (RePRI, DIaM, PFENet).
        ignore_index (`int`, *optional*, defaults to 255):
            Label of ignored pixels.
        background_name (`str`, *optional*, defaults to `"background"`):
            Name of class 0.
        base_class_names (`tuple[str]`, *optional*):
            Names of the base classes, in the order of the classifier rows 1..B.
        novel_class_names (`tuple[str]`, *optional*):
            Names of the novel classes appended after the base rows.
        projection_dim (`int`, *optional*, defaults to 256):
            Output channels of the contrastive projection head.
        projection_source (`str`, *optional*, defaults to `"decoder"`):
            Which feature the projection head reads: `"decoder"` (the paper) or `"backbone"` (layer4).
        use_projection (`bool`, *optional*, defaults to `True`):
            Whether to build the projection head (needed only for contrastive pre-training).
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the pre-training cross-entropy returned as `loss` by `forward(labels=...)`.
        backbone_pretrained (`str`, *optional*):
            Where the backbone's pre-trained weights come from, loaded after construction by
            `gfss_hf.conversion.load_backbone_weights()`: a timm pretrained tag (`"resnet50s.gluon_in1k"`), a timm Hub
            id (`"timm/vit_small_patch14_dinov2.lvd142m"`, fetched with `huggingface_hub` and cached) or a local file.
        backbone_weights_path (`str`, *optional*):
            Older name of a local `backbone_pretrained` file; copied into `backbone_pretrained` when that is unset.
        image_mean (`tuple[float]`, *optional*), image_std (`tuple[float]`, *optional*):
            Normalisation of the backbone's pre-training (0-1 scale), used by `GFSSImageProcessor.from_config`;
            `None` means ImageNet's. Filled from timm's `pretrained_cfg` when `backbone_pretrained` is a timm tag.
        dataset (`str`, *optional*), fold (`int`, *optional*), split_kind (`str`, *optional*):
            Where the base classes come from; informative, used by model cards and evaluation.
        source_checkpoint (`str`, *optional*):
            Provenance of converted weights (layout name and file).

    Example:

    ```python
    >>> from gfss_hf import GFSSConfig, GFSSModel
    >>> config = GFSSConfig(base_class_names=("cat", "dog"))
    >>> config.id2label
    {0: 'background', 1: 'cat', 2: 'dog'}
    ```
    """

    model_type = "gfss"

    backbone: str = "resnet50s"
    output_stride: int | None = 8
    dilation_style: str = "timm"
    backbone_kwargs: dict | None = None
    pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6)
    ppm_align_corners: bool = True
    hidden_size: int = 512
    dropout: float = 0.1
    classifier_bias: bool = False
    logits_align_corners: bool = True
    image_size: int = 473
    pad_mode: str = "mean"
    ignore_index: int = 255
    background_name: str = "background"
    base_class_names: list[str] | tuple[str, ...] = ()
    novel_class_names: list[str] | tuple[str, ...] = ()
    projection_dim: int = 256
    projection_source: str = "decoder"
    use_projection: bool = True
    label_smoothing: float = 0.1
    backbone_pretrained: str | None = None
    backbone_weights_path: str | None = None
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None
    dataset: str | None = None
    fold: int | None = None
    split_kind: str | None = None
    source_checkpoint: str | None = None

    def __post_init__(self, **kwargs):
        # id2label / label2id / num_labels are derived from the class names. A saved config.json carries id2label
        # too: it must agree with the names; a hand-written config with id2label alone provides the names.
        given_id2label = self.id2label
        kwargs.pop("num_labels", None)
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self.pool_scales = tuple(int(s) for s in self.pool_scales)
        self.base_class_names = tuple(self.base_class_names)
        self.novel_class_names = tuple(self.novel_class_names)
        # One mechanism for backbone weights: the older local-file field feeds `backbone_pretrained`.
        if self.backbone_weights_path and not self.backbone_pretrained:
            self.backbone_pretrained = str(self.backbone_weights_path)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else tuple(float(v) for v in value))
        if given_id2label and not self.base_class_names and not self.novel_class_names:
            names = [given_id2label[k] for k in sorted(given_id2label, key=int)]
            self.background_name = names[0]
            self.base_class_names = tuple(names[1:])
        self._validate()
        id2label = self._derived_id2label()
        if given_id2label and {int(k): v for k, v in given_id2label.items()} != id2label:
            raise ValueError(
                f"id2label={given_id2label!r} disagrees with background_name/base_class_names/novel_class_names "
                f"({id2label!r}); id2label is derived from the class names: pass the names only."
            )
        self.id2label = id2label
        self.label2id = {v: k for k, v in id2label.items()}
        super().__post_init__(**kwargs)

    # -- label bookkeeping -------------------------------------------------------------------------------------
    def _derived_id2label(self) -> dict[int, str]:
        names = [self.background_name, *self.base_class_names, *self.novel_class_names]
        return dict(enumerate(names))

    def set_class_names(self, base_class_names=None, novel_class_names=None) -> None:
        """Replace the base and/or novel class names and re-derive `id2label` (used by `expand_classifier`)."""
        if base_class_names is not None:
            self.base_class_names = tuple(base_class_names)
        if novel_class_names is not None:
            self.novel_class_names = tuple(novel_class_names)
        self._validate_names()
        self.id2label = self._derived_id2label()
        self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def num_base_classes(self) -> int:
        return len(self.base_class_names)

    @property
    def num_novel_classes(self) -> int:
        return len(self.novel_class_names)

    @property
    def class_names(self) -> list[str]:
        """All class names in classifier-row order: background, base, novel."""
        return [self.background_name, *self.base_class_names, *self.novel_class_names]

    # -- validation --------------------------------------------------------------------------------------------
    def _validate_names(self) -> None:
        names = [self.background_name, *self.base_class_names, *self.novel_class_names]
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"class names must be non-empty strings, got {name!r}; fix the class name list.")
        seen = set()
        for name in names:
            if name in seen:
                raise ValueError(
                    f"class name {name!r} appears twice in background_name/base_class_names/novel_class_names; "
                    "every class needs a unique name."
                )
            seen.add(name)

    def _validate(self) -> None:
        def bad(field, value, rule):
            raise ValueError(f"GFSSConfig.{field}={value!r} is invalid: {rule}.")

        # Types and finiteness first: NaN passes every range comparison (`not nan < 1` is True) and would build a
        # model of non-finite tensors.
        for name in ("hidden_size", "image_size", "ignore_index", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                bad(name, value, f"expected an integer, got {type(value).__name__}")
        for name in ("dropout", "label_smoothing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(name, value, "expected a finite number")
        if not isinstance(self.backbone, str) or not self.backbone:
            bad("backbone", self.backbone, "give a timm model name such as 'resnet50s'")
        if self.output_stride is not None and (
            isinstance(self.output_stride, bool) or self.output_stride not in (8, 16, 32)
        ):
            bad("output_stride", self.output_stride, "allowed values are 8, 16 and 32 (or None: the backbone's own)")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                bad(name, value, "give three finite numbers (R, G, B on a 0-1 scale) or None for ImageNet's")
        if self.image_std is not None and any(v <= 0 for v in self.image_std):
            bad("image_std", self.image_std, "every value must be positive")
        if self.backbone_pretrained is not None and (
            not isinstance(self.backbone_pretrained, str) or not self.backbone_pretrained
        ):
            bad("backbone_pretrained", self.backbone_pretrained, "give a timm tag, a timm Hub id or a local file")
        if self.dilation_style not in _DILATION_STYLES:
            bad("dilation_style", self.dilation_style, f"allowed values are {_DILATION_STYLES}")
        if not self.pool_scales or any(s < 1 for s in self.pool_scales):
            bad("pool_scales", self.pool_scales, "give one or more positive bin sizes, e.g. (1, 2, 3, 6)")
        if self.hidden_size < 1:
            bad("hidden_size", self.hidden_size, "must be a positive number of channels")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "must be in [0, 1)")
        if self.image_size < 32:
            bad("image_size", self.image_size, "must be at least 32 pixels")
        if self.pad_mode not in _PAD_MODES:
            bad("pad_mode", self.pad_mode, f"allowed values are {_PAD_MODES}")
        if not 0 <= self.ignore_index <= 255:
            bad("ignore_index", self.ignore_index, "must fit in uint8 (0..255); the convention is 255")
        if self.projection_dim < 1:
            bad("projection_dim", self.projection_dim, "must be a positive number of channels")
        if self.projection_source not in _FEATURE_SOURCES:
            bad("projection_source", self.projection_source, f"allowed values are {_FEATURE_SOURCES}")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", self.label_smoothing, "must be in [0, 1)")
        if len(self.base_class_names) + 1 + len(self.novel_class_names) >= self.ignore_index:
            bad(
                "base_class_names",
                len(self.base_class_names),
                f"too many classes for ignore_index={self.ignore_index}",
            )
        self._validate_names()
