"""GFSS model: a timm backbone (a ResNet dilated to output stride 8 by default; any timm model with `features_only`
support, ConvNeXt and DINOv2 ViTs included), a pyramid pooling decoder (PSPNet) and a 1x1 classifier that grows with
novel classes.

This is the one model file: it imports only `configuration_gfss` and `losses` relatively, so a saved folder with
`trust_remote_code=True` works without the `gfss_hf` package.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .configuration_gfss import GFSSConfig
from .losses import label_smoothed_cross_entropy

__all__ = [
    "GFSSModel",
    "create_backbone",
    "GFSSModelOutput",
    "GFSSPreTrainedModel",
    "GFSSPyramidPooling",
    "quiet_weight_loading",
]

logger = logging.get_logger(__name__)

_quiet_lock = threading.Lock()
_quiet_depth = 0
_quiet_previous_hook = None


def _silent_tqdm(factory, args, kwargs):
    kwargs = {**kwargs, "disable": True}
    previous = _quiet_previous_hook
    return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)


@contextmanager
def quiet_weight_loading():
    """
    Silence the progress bars that transformers itself draws (the per-tensor "Loading weights" bar of
    `from_pretrained`, a screenful of carriage returns on every load that tells a user nothing) inside the block.

    Only transformers' own bars are touched, through its tqdm hook: downloads from the Hub keep their
    huggingface_hub bars (they say how much is left to fetch), and the global switches
    (`transformers.utils.logging.disable_progress_bar`, `HF_HUB_DISABLE_PROGRESS_BARS`) are left as they are. The
    hook that was set before is restored on exit, also when nested or entered from several threads at once. With a
    transformers without `set_tqdm_hook` the block runs unchanged.

    Example:

    ```python
    >>> from transformers.utils import logging
    >>> with quiet_weight_loading():
    ...     bar = logging.tqdm(range(3), desc="Loading weights")
    >>> bar.disable
    True
    ```
    """
    global _quiet_depth, _quiet_previous_hook
    set_hook = getattr(logging, "set_tqdm_hook", None)
    if set_hook is None:
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            _quiet_previous_hook = set_hook(_silent_tqdm)
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                set_hook(_quiet_previous_hook)
                _quiet_previous_hook = None


@dataclass
class GFSSModelOutput(ModelOutput):
    r"""
    Output of [`GFSSModel`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            Label-smoothed cross-entropy on `labels` (returned when `labels` is given).
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, height, width)`):
            Class scores upsampled to the input size; rows ordered `[background, base..., novel...]`.
        features (`torch.FloatTensor` of shape `(batch_size, hidden_size, h, w)`):
            The dense decoder feature `I` the classifier reads (`h = height / feature_stride`: the output stride, or a
            ViT's patch size).
        embeddings (`torch.FloatTensor` of shape `(batch_size, projection_dim, h, w)`, *optional*):
            L2-normalised contrastive embeddings (returned with `output_embeddings=True`).
        backbone_features (`torch.FloatTensor` of shape `(batch_size, C4, h, w)`, *optional*):
            The last backbone stage (returned with `output_backbone_features=True`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    features: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    backbone_features: torch.FloatTensor | None = None


class GFSSPyramidPooling(nn.Module):
    """
    Pyramid pooling module + bottleneck of PSPNet.

    Each bin `s` adaptive-average-pools the input to `s x s`, projects it with a 1x1 conv (no bias) to
    `in_channels // len(pool_scales)` channels, BN, ReLU, and upsamples bilinearly back. The input and the stages are
    concatenated `[input, stage_0, ..., stage_n]` and reduced by a 3x3 conv (no bias) + BN + ReLU + Dropout2d to
    `hidden_size` channels.

    Args:
        in_channels (`int`): channels of the backbone feature.
        hidden_size (`int`): output channels.
        pool_scales (`tuple[int]`): the bins.
        dropout (`float`): Dropout2d probability.
        align_corners (`bool`): of the stage upsampling.
    """

    def __init__(self, in_channels: int, hidden_size: int, pool_scales, dropout: float, align_corners: bool):
        super().__init__()
        stage_channels = in_channels // len(pool_scales)
        self.align_corners = align_corners
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(scale),
                nn.Conv2d(in_channels, stage_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(stage_channels),
                nn.ReLU(inplace=True),
            )
            for scale in pool_scales
        )
        self.bottleneck = nn.Sequential(
            nn.Conv2d(in_channels + stage_channels * len(pool_scales), hidden_size, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_size),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outs = [x]
        for stage in self.stages:
            outs.append(F.interpolate(stage(x), size=size, mode="bilinear", align_corners=self.align_corners))
        return self.bottleneck(torch.cat(outs, dim=1))


def create_backbone(config: GFSSConfig, **timm_kwargs) -> nn.Module:
    """The timm `features_only` backbone of `config` (last stage only); random weights unless `timm_kwargs` (passed to
    `timm.create_model`, e.g. by `gfss_hf.conversion.load_backbone_weights`) ask timm for pre-trained ones.

    Convolutional backbones get `output_stride` (timm dilates them). A ViT has no output stride to set (its stride is
    its patch size): it needs `output_stride=None`, and gets `img_size=image_size, dynamic_img_size=True` unless
    `backbone_kwargs` says otherwise, so that its position embedding fits the canvas and other sizes still work."""
    kwargs = dict(config.backbone_kwargs)
    common = {"pretrained": False, "features_only": True, "out_indices": (-1,), **timm_kwargs}

    def refuse(err: TypeError):
        return ValueError(
            f"timm cannot build {config.backbone!r} with backbone_kwargs={kwargs}: {err}. Keyword arguments of "
            "another architecture (e.g. ResNet `channels`) must go: `--set model.backbone_kwargs={}`."
        )

    if config.output_stride is not None:
        try:
            return timm.create_model(config.backbone, output_stride=config.output_stride, **common, **kwargs)
        except TypeError as err:
            if "output_stride" not in str(err):
                raise refuse(err) from err
            raise ValueError(
                f"backbone {config.backbone!r} cannot change its output stride (a ViT's stride is fixed by its patch "
                f"size), so output_stride={config.output_stride} cannot be honoured. Set output_stride=None "
                "(`--set model.output_stride=null`) to use its native stride; the decoder then reads a map of "
                "image_size / patch_size cells, so choose image_size as a multiple of the patch size."
            ) from None
    vit_defaults = {"img_size": config.image_size, "dynamic_img_size": True}
    try:
        return timm.create_model(config.backbone, **common, **{**vit_defaults, **kwargs})
    except TypeError as err:
        # Not a ViT: convolutional models take no image size.
        if not any(name in str(err) for name in vit_defaults):
            raise refuse(err) from err
    try:
        return timm.create_model(config.backbone, **common, **kwargs)
    except TypeError as err:
        raise refuse(err) from err


def _patch_size(backbone: nn.Module) -> int | None:
    """The patch size of a ViT backbone (timm wraps it as `.model` in `features_only` mode), `None` for a CNN."""
    inner = getattr(backbone, "model", backbone)
    patch_size = getattr(getattr(inner, "patch_embed", None), "patch_size", None)
    if patch_size is None:
        return None
    return int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)


class GFSSPreTrainedModel(PreTrainedModel):
    config_class = GFSSConfig
    config: GFSSConfig
    base_model_prefix = "gfss"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained` without transformers' "Loading weights" progress bar (see
        [`quiet_weight_loading`]): every load of the model, by the pipeline, the scripts, the Space or the Auto
        classes, is quiet; warnings and Hub download bars still show."""
        with quiet_weight_loading():
            return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            if module is getattr(self, "classifier", None):
                init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)


class GFSSModel(GFSSPreTrainedModel):
    r"""
    PSPNet for generalized few-shot segmentation: timm backbone (`features_only`, dilated by `output_stride`) ->
    pyramid pooling decoder -> dense feature `I` (`hidden_size` channels) -> 1x1 classifier whose rows are
    `[background, base..., novel...]` (`config.id2label`). An optional projection head gives L2-normalised pixel
    embeddings for contrastive pre-training.

    The model does not fine-tune itself: few-shot adaptation lives in `gfss_hf.adaptation`, which reads the
    classifier rows from the model; `gfss_hf.learning.learn_classes(model, images, masks, names)` writes learned
    rows back with [`~GFSSModel.expand_classifier`], so that `save_pretrained` publishes them.

    Example:

    ```python
    >>> import torch
    >>> from gfss_hf import GFSSConfig, GFSSModel
    >>> config = GFSSConfig(backbone="resnet18", hidden_size=64, image_size=64, base_class_names=("a", "b"))
    >>> model = GFSSModel(config).eval()
    >>> out = model(torch.randn(1, 3, 64, 64))
    >>> out.logits.shape, out.features.shape
    (torch.Size([1, 3, 64, 64]), torch.Size([1, 64, 8, 8]))
    ```
    """

    def __init__(self, config: GFSSConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        self._patch_size = _patch_size(self.backbone)
        if self._patch_size is not None and config.image_size % self._patch_size:
            size = config.image_size
            raise ValueError(
                f"image_size={size} is not a multiple of the patch size {self._patch_size} of {config.backbone!r}; "
                f"use {size - size % self._patch_size} or {size + self._patch_size - size % self._patch_size}."
            )
        if config.dilation_style == "pspnet":
            self._apply_pspnet_dilation()
        in_channels = self.backbone.feature_info.channels()[-1]
        self.decoder = GFSSPyramidPooling(
            in_channels, config.hidden_size, config.pool_scales, config.dropout, config.ppm_align_corners
        )
        self.classifier = nn.Conv2d(config.hidden_size, config.num_labels, kernel_size=1, bias=config.classifier_bias)
        if config.use_projection:
            source = config.hidden_size if config.projection_source == "decoder" else in_channels
            self.projection = nn.Sequential(
                nn.Conv2d(source, source, kernel_size=1),
                nn.BatchNorm2d(source),
                nn.ReLU(inplace=True),
                nn.Conv2d(source, config.projection_dim, kernel_size=1),
            )
        else:
            self.projection = None
        self._backbone_frozen = False
        self._freeze_decoder = True
        self.post_init()

    # -- structure ---------------------------------------------------------------------------------------------
    def _apply_pspnet_dilation(self) -> None:
        """Dilate the first block of layer3/layer4 as the PSPNet code does (timm keeps the previous dilation there).

        Dilation is not stored in a state dict, so converted checkpoints need this to compute what they computed."""
        if self.config.output_stride != 8:
            raise ValueError(
                f"dilation_style='pspnet' needs output_stride=8, got {self.config.output_stride}; use "
                "dilation_style='timm'."
            )
        for layer_name, dilation in (("layer3", 2), ("layer4", 4)):
            layer = getattr(self.backbone, layer_name, None)
            conv = getattr(layer[0], "conv2", None) if layer is not None else None
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(
                    f"dilation_style='pspnet' expects a ResNet bottleneck backbone with {layer_name}[0].conv2; "
                    f"backbone {self.config.backbone!r} has none. Use dilation_style='timm'."
                )
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation * (conv.kernel_size[0] // 2), dilation * (conv.kernel_size[1] // 2))

    @property
    def num_base_classes(self) -> int:
        return self.config.num_base_classes

    @property
    def feature_stride(self) -> int:
        """Pixels per cell of the backbone feature the decoder reads (timm's feature info: the output stride of a
        CNN, the patch size of a ViT)."""
        return int(self.backbone.feature_info.reduction()[-1])

    # -- freezing ----------------------------------------------------------------------------------------------
    def freeze_backbone(self, include_decoder: bool = True) -> GFSSModel:
        """Freeze backbone + decoder (+ projection): `requires_grad=False` and eval mode (BatchNorm running statistics,
        no dropout), which `.train()` does not undo. Only the classifier stays trainable. With
        `include_decoder=False` only the backbone is frozen (frozen-backbone pre-training). Returns `self`."""
        if self._backbone_frozen:
            self.unfreeze_backbone()
        self._backbone_frozen = True
        self._freeze_decoder = include_decoder
        for module in self._frozen_modules():
            module.requires_grad_(False)
            module.eval()
        return self

    def unfreeze_backbone(self) -> GFSSModel:
        """Undo `freeze_backbone()`. Returns `self`."""
        self._backbone_frozen = False
        for module in self._frozen_modules():
            module.requires_grad_(True)
            module.train(self.training)
        return self

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def _frozen_modules(self):
        if not getattr(self, "_freeze_decoder", True):
            return [self.backbone]
        return [m for m in (self.backbone, self.decoder, self.projection) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_backbone_frozen", False):
            for module in self._frozen_modules():
                module.eval()
        return self

    @torch.no_grad()
    def expand_classifier(
        self,
        novel_class_names,
        weights: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        seed: int = 0,
    ) -> GFSSModel:
        """
        Append one classifier row per novel class, keeping the existing rows bit-identical, and record the names in
        the config (so `save_pretrained` -> `from_pretrained` gives back the expanded model).

        Args:
            novel_class_names (`list[str]`): names of the new classes; must not exist yet.
            weights (`torch.Tensor` of shape `(N, hidden_size)` or `(N, hidden_size, 1, 1)`, *optional*):
                Rows for the new classes (e.g. adapted by few-shot fine-tuning). Default: normal with std 0.01 drawn
                from a generator seeded with `seed` (the reference initialises novel rows randomly).
            bias (`torch.Tensor` of shape `(N,)`, *optional*): bias of the new rows when the classifier has a bias;
                default 0.
            seed (`int`, *optional*, defaults to 0): seed of the default initialisation.

        Returns:
            `self`.
        """
        names = [str(n) for n in novel_class_names]
        if not names:
            raise ValueError("novel_class_names is empty; give at least one class name.")
        existing = set(self.config.class_names)
        for name in names:
            if name in existing:
                raise ValueError(
                    f"class {name!r} already exists in the model ({self.config.class_names}); choose another name."
                )
        if len(set(names)) != len(names):
            raise ValueError(f"novel_class_names {names} repeats a name; every class needs a unique name.")
        old = self.classifier
        hidden = old.weight.shape[1]
        if weights is None:
            generator = torch.Generator().manual_seed(seed)
            weights = torch.randn(len(names), hidden, generator=generator) * 0.01
        weights = weights.detach().reshape(len(names), -1)
        if weights.shape[1] != hidden:
            raise ValueError(
                f"weights has {weights.shape[1]} features per row but the classifier reads {hidden}; give "
                f"weights of shape ({len(names)}, {hidden})."
            )
        new = nn.Conv2d(hidden, old.out_channels + len(names), kernel_size=1, bias=old.bias is not None)
        new = new.to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(torch.cat([old.weight, weights.to(old.weight)[:, :, None, None]], dim=0))
        if old.bias is not None:
            extra = torch.zeros(len(names)) if bias is None else bias.detach().reshape(len(names))
            new.bias.copy_(torch.cat([old.bias, extra.to(old.bias)]))
        elif bias is not None:
            raise ValueError("bias was given but the classifier has no bias (config.classifier_bias=False).")
        new.weight.requires_grad_(old.weight.requires_grad)
        self.classifier = new
        self.config.set_class_names(novel_class_names=(*self.config.novel_class_names, *names))
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        # The Hub export maps AutoModel (registered in gfss_hf/__init__.py); the segmenting Auto class points to the
        # same class, so `AutoModelForSemanticSegmentation.from_pretrained(..., trust_remote_code=True)` works too.
        if self._auto_class is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map["AutoModelForSemanticSegmentation"] = "modeling_gfss.GFSSModel"
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    # -- forward -----------------------------------------------------------------------------------------------
    def extract_features(self, pixel_values: torch.Tensor, return_backbone: bool = False):
        """Dense decoder feature `I` (B, hidden_size, h, w); with `return_backbone`, also the last backbone stage."""
        backbone_features = self.backbone(pixel_values)[-1]
        features = self.decoder(backbone_features)
        return (features, backbone_features) if return_backbone else features

    def upsample_logits(self, logits: torch.Tensor, size) -> torch.Tensor:
        """Bilinear upsampling of logits to `size` with the config's `align_corners`."""
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=self.config.logits_align_corners)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_embeddings: bool | None = None,
        output_backbone_features: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> GFSSModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
                Normalised images (see [`GFSSImageProcessor`]).
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Classifier-row labels (background 0, base 1..B), `config.ignore_index` ignored. When given, `loss`
                is the label-smoothed cross-entropy (`config.label_smoothing`) at the input resolution.
            output_embeddings (`bool`, *optional*):
                Return L2-normalised contrastive embeddings (needs `config.use_projection`).
            output_backbone_features (`bool`, *optional*):
                Return the last backbone stage.

        Returns:
            [`GFSSModelOutput`] (or a tuple with `return_dict=False`).
        """
        if kwargs:
            raise TypeError(f"GFSSModel.forward got unexpected arguments {sorted(kwargs)}.")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must have shape (batch, 3, height, width), got {tuple(pixel_values.shape)}; use "
                "GFSSImageProcessor to prepare images."
            )
        patch = getattr(self, "_patch_size", None)
        if patch is not None and (pixel_values.shape[-1] % patch or pixel_values.shape[-2] % patch):
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} do not divide into {patch}x{patch} patches of "
                f"{self.config.backbone!r}; use height and width that are multiples of {patch} (GFSSImageProcessor "
                "pads to config.image_size, which is one)."
            )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features, backbone_features = self.extract_features(pixel_values, return_backbone=True)
        logits = self.upsample_logits(self.classifier(features), pixel_values.shape[-2:])
        embeddings = None
        if output_embeddings:
            if self.projection is None:
                raise ValueError("output_embeddings=True needs a projection head: set config.use_projection=True.")
            source = features if self.config.projection_source == "decoder" else backbone_features
            embeddings = F.normalize(self.projection(source), p=2, dim=1)
        loss = None
        if labels is not None:
            loss = label_smoothed_cross_entropy(
                logits, labels, epsilon=self.config.label_smoothing, ignore_index=self.config.ignore_index
            )
        output = GFSSModelOutput(
            loss=loss,
            logits=logits,
            features=features,
            embeddings=embeddings,
            backbone_features=backbone_features if output_backbone_features else None,
        )
        return output if return_dict else output.to_tuple()
