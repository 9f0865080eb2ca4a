"""The settings of a pre-training run: [`TrainingConfig`], read from YAML with `--set key=value` overrides, and the
checks that name a bad value before any model is built.

The architecture lives under `model:` and is passed to [`GFSSConfig`] as is (its defaults are declared there once);
[`INFRASTRUCTURE_KEYS`] are the keys a resumed run may change.

```python
>>> from gfss_hf.training_config import TrainingConfig
>>> config = TrainingConfig.from_yaml("scripts/configs/synthetic.yaml", overrides=["model.backbone=resnet18"])
>>> config.model_settings["backbone"]
'resnet18'
```
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers.utils import logging

from .configuration_gfss import GFSSConfig
from .data.sources import DATASET_NAMES

logger = logging.get_logger(__name__)

__all__ = [
    "INFRASTRUCTURE_KEYS",
    "MODEL_KEYS",
    "TrainingConfig",
    "as_model_kwargs",
    "model_defaults",
    "parse_overrides",
]


@dataclass
class TrainingConfig:
    r"""
    Every hyper-parameter of a pre-training run. Load it from YAML with [`TrainingConfig.from_yaml`]; unknown keys
    are an error that lists the valid ones.

    Args:
        dataset (`str`, defaults to `"synthetic"`): `"synthetic"` (embedded, no download), `"pascal5i"`,
            `"pascal10i"`, `"coco20i"`, `"camvid"` (the SegNet tutorial's 11-class CamVid folders) or `"folder"`
            (your own images + masks + classes.json).
        fold (`int`, defaults to 0): the fold whose base classes are trained (novel pixels are ignored).
        split_kind (`str`, *optional*): fold-table variant (COCO-20i: `"interleaved"` or `"consecutive"`).
        data_dir (`str`, *optional*): root of the data (not used by `"synthetic"`).
        cache_dir (`str`, *optional*): `datasets` cache of the builders (default: the Hugging Face cache).
        num_train_images (`int`, defaults to 1000): size of the synthetic train split.
        num_val_images (`int`, *optional*, defaults to 200): validation images (synthetic: the split size; other
            datasets: the first `num_val_images` of the val list; `None`: all).
        dataset_seed (`int`, defaults to 0): seed of the synthetic renderer.
        min_pixels (`int`, *optional*): base-training filter (an image needs a base class with this many pixels);
            `None` uses the builder's default (2,048 px; 1,582 px for CamVid's 480x360; 64 px for the 96-px synthetic
            images).
        novel_to_background (`bool`, defaults to `False`): label novel pixels background instead of ignoring them.
        model (`dict`, defaults to `{}`): the architecture, passed to [`GFSSConfig`] as is: `backbone`,
            `backbone_kwargs`, `output_stride`, `dilation_style`, `hidden_size`, `pool_scales`, `dropout`,
            `image_size`, `pad_mode`, `projection_dim`, `projection_source`, ... Unset keys take GFSSConfig's
            defaults (the one place they are declared). The class lists, dataset and fold come from the run, the
            projection head from `contrastive_weight`. The flat keys of older configs (`backbone: resnet18` at the
            top level) are translated, with a warning.
        backbone_weights (`str`, *optional*): older spelling of `model.backbone_pretrained` for a local file of
            ImageNet backbone weights ([`gfss_hf.conversion.load_backbone_weights`]); prefer
            `--set model.backbone_pretrained=resnet50s.gluon_in1k` (a timm tag, a `timm/...` Hub id or a file).
        freeze_backbone (`bool`, defaults to `False`): train the decoder, classifier and projection only: the
            backbone gets `requires_grad=False`, stays in eval mode (BatchNorm statistics kept) and is left out of
            the optimizer, so its weights end the run bit-identical to the pre-trained ones.
        num_epochs (`int`, defaults to 100), max_steps (`int`, *optional*): length of the run in epochs, or in
            optimizer steps when `max_steps` is given.
        batch_size (`int`, defaults to 12): images per process per forward pass.
        gradient_accumulation_steps (`int`, defaults to 1): forward passes per optimizer step.
        optimizer (`str`, defaults to `"sgd"`): `"sgd"` (the paper: momentum, weight decay) or `"adamw"` (leaves
            the all-background solution much sooner when training from scratch, as on the synthetic data).
        learning_rate (`float`, 2.5e-3), momentum (`float`, 0.9, SGD only), weight_decay (`float`, 1e-4).
        lr_schedule (`str`, defaults to `"cosine"`): `"cosine"` (to 0 at the last step) or `"constant"`.
        label_smoothing (`float`, defaults to 0.1): epsilon of the cross-entropy.
        contrastive_weight (`float`, defaults to 0.1): lambda; 0 disables the term and skips the projection head.
        contrastive_warmup_steps (`int`, defaults to 0): ramp lambda linearly from 0 to `contrastive_weight` over the
            first N optimizer steps (0: the paper's constant lambda). From scratch the early features are noise and
            the term then pulls on random embeddings while cross-entropy is still leaving the all-background solution.
        temperature (`float`, 0.1), base_temperature (`float`, *optional*), max_samples (`int`, 1024),
        max_views (`int`, 100), background_anchors (`bool`, `False`): the contrastive loss
            (see `gfss_hf.losses.contrastive_loss_from_samples`).
        hflip (`bool`, defaults to `True`): random horizontal flips (the only augmentation of the paper).
        scale_range (`list[float]`, *optional*): `[low, high]`: rescale each prepared training sample by a factor
            drawn uniformly from the range, then crop (factor > 1) or pad (< 1, labels 255) back to the canvas at a
            random position. It breaks the position prior of datasets shot from one viewpoint (street scenes: road at
            the bottom, sky at the top). `None` (default) disables it, as in the paper.
        color_jitter (`float`, defaults to 0): strength `j` of random brightness, contrast and saturation changes
            (each factor uniform in `[1 - j, 1 + j]`) applied to the training images; 0 disables it.
        seed (`int`, defaults to 0): seed of initialisation, data order, flips, dropout and sampling.
        num_workers (`int`, defaults to 2): DataLoader workers.
        mixed_precision (`str`, defaults to `"no"`): `"no"`, `"fp16"` or `"bf16"`.
        output_dir (`str`, defaults to `"outputs/pretrain"`): where checkpoints, logs and the final model go.
        checkpointing_steps (`int`, *optional*): save a resumable state every N optimizer steps.
        checkpoints_total_limit (`int`, *optional*): keep only the newest N checkpoints.
        stop_after_steps (`int`, *optional*): end the run after N optimizer steps with a checkpoint but without
            the final model (the schedule still spans the whole run): split a long run into several jobs.
        eval_every_epochs (`int`, defaults to 1): validation base mIoU every N epochs (0: only at the end).
        logging_steps (`int`, defaults to 10): log the loss terms and the lr every N optimizer steps.
        report_to (`str`, defaults to `"auto"`): Accelerate tracker (`"tensorboard"`, `"wandb"`, ...); `"auto"`
            uses tensorboard when it is installed, `"none"` disables trackers (the JSON-lines log is always written).

    Example:

    ```python
    >>> config = TrainingConfig.from_yaml("scripts/configs/synthetic.yaml", overrides=["num_epochs=2"])
    >>> config.num_epochs
    2
    ```
    """

    # data
    dataset: str = "synthetic"
    fold: int = 0
    split_kind: str | None = None
    data_dir: str | None = None
    cache_dir: str | None = None
    num_train_images: int = 1000
    num_val_images: int | None = 200
    dataset_seed: int = 0
    min_pixels: int | None = None
    novel_to_background: bool = False
    # model
    model: dict = field(default_factory=dict)
    backbone_weights: str | None = None
    freeze_backbone: bool = False
    # optimisation
    num_epochs: int = 100
    max_steps: int | None = None
    batch_size: int = 12
    gradient_accumulation_steps: int = 1
    optimizer: Literal["sgd", "adamw"] = "sgd"
    learning_rate: float = 2.5e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # loss
    label_smoothing: float = 0.1
    contrastive_weight: float = 0.1
    contrastive_warmup_steps: int = 0
    temperature: float = 0.1
    base_temperature: float | None = None
    max_samples: int = 1024
    max_views: int = 100
    background_anchors: bool = False
    # loop
    hflip: bool = True
    scale_range: list[float] | None = None
    color_jitter: float = 0.0
    seed: int = 0
    num_workers: int = 2
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    output_dir: str = "outputs/pretrain"
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    stop_after_steps: int | None = None
    eval_every_epochs: int = 1
    logging_steps: int = 10
    report_to: str = "auto"

    def __post_init__(self):
        self.validate()

    # -- the model -----------------------------------------------------------------------------------------------
    @property
    def model_settings(self) -> dict[str, Any]:
        """The architecture with GFSSConfig's defaults filled in (`model` overrides them)."""
        return {**model_defaults(), **self.model}

    @property
    def image_size(self) -> int:
        """Canvas size of the model (`model.image_size`), at which the data are prepared."""
        return self.model_settings["image_size"]

    @property
    def pad_mode(self) -> str:
        """Padding of the model's canvas (`model.pad_mode`)."""
        return self.model_settings["pad_mode"]

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def translate_flat_model_keys(cls, values: Mapping[str, Any], source: str = "the config") -> dict[str, Any]:
        """
        Move the model keys of older configs (`backbone: resnet18` at the top level) and `--set model.KEY=VALUE`
        overrides into the `model` mapping; a key given both ways is an error.
        """
        values = dict(values)
        model = values.get("model", {})
        if not isinstance(model, Mapping):
            raise ValueError(
                f"`model` in {source} must be a mapping of GFSSConfig fields (e.g. model: {{backbone: "
                f"resnet18}}), got {type(model).__name__}."
            )
        model = dict(model)
        flat = [k for k in values if k in MODEL_KEYS]
        dotted = [k for k in values if isinstance(k, str) and k.startswith("model.")]
        if flat:
            logger.warning(
                f"{source}: the top-level model key(s) {flat} are deprecated; write them under `model:` (e.g. "
                f"`model: {{{flat[0]}: ...}}`, or --set model.{flat[0]}=...). Read as model.{flat[0]} etc."
            )
        for key in [*flat, *dotted]:
            name = key.removeprefix("model.")
            if name in model:
                raise ValueError(f"{source} sets the model's {name!r} twice ({key!r} and model.{name}); keep one.")
            model[name] = values.pop(key)
        if flat or dotted or "model" in values:
            values["model"] = model
        return values

    @classmethod
    def check_known_keys(cls, values: Mapping[str, Any], source: str = "the config") -> None:
        """Raise a `ValueError` naming the unknown keys of `values` (with the closest valid key) and the valid ones."""
        names = cls.field_names()
        unknown = sorted(set(values) - set(names), key=str)
        if unknown:
            import difflib

            hints = [f"{k!r} -> {m[0]!r}" for k in unknown if (m := difflib.get_close_matches(str(k), names, n=1))]
            raise ValueError(
                f"unknown key(s) {unknown} in {source}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
                + f"; valid keys are: {', '.join(names)}. Fix the spelling or remove them."
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "the config") -> TrainingConfig:
        """Build from a flat mapping; unknown keys raise a `ValueError` that lists the valid keys."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{source} must be a mapping of keys to values, got {type(values).__name__}.")
        values = cls.translate_flat_model_keys(values, source)
        cls.check_known_keys(values, source)
        for f in dataclasses.fields(cls):
            # YAML reads `1e-3` (no dot) as a string; a float key takes it as the number it spells.
            if f.name in values and isinstance(values[f.name], str) and str(f.type).split("|")[0].strip() == "float":
                try:
                    values[f.name] = float(values[f.name])
                except ValueError:
                    pass  # validate() names the key and the expected type
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainingConfig:
        """
        Read a YAML file of `key: value` pairs (the architecture under `model:`), then apply `overrides`.

        Args:
            path (`str` or `os.PathLike`): the YAML file.
            overrides (`Sequence[str]` of `"key=value"` or a `Mapping`, *optional*): values that replace the file's;
                a string value is parsed as YAML (`"max_steps=10"` gives an int, `"base_temperature=null"` None);
                `"model.backbone=resnet18"` replaces one key of the `model` mapping.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist; pass --config with a YAML file.")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            problem = " ".join(str(err).split())
            raise ValueError(
                f"config file {str(path)!r} cannot be parsed as YAML ({problem}); fix its syntax."
            ) from err
        if not isinstance(values, dict):
            raise ValueError(f"{str(path)!r} must hold a mapping of `key: value` lines, got {type(values).__name__}.")
        # Unknown keys are reported against where they were written: the file or the overrides.
        values = cls.translate_flat_model_keys(values, repr(str(path)))
        overrides = cls.translate_flat_model_keys(parse_overrides(overrides), "the overrides (--set)")
        cls.check_known_keys(values, repr(str(path)))
        cls.check_known_keys(overrides, "the overrides (--set)")
        model = {**values.get("model", {}), **overrides.pop("model", {})}
        values.update(overrides)
        if model:
            values["model"] = model
        return cls.from_dict(values, source=f"{str(path)!r} + overrides")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _check_types(self) -> None:
        _check_field_types(self)

    def replace(self, **changes) -> TrainingConfig:
        """A copy with `changes`; `model={...}` is merged into the current `model` mapping."""
        values = self.to_dict()
        changes = self.translate_flat_model_keys(changes, "replace()")
        values["model"] = {**values["model"], **changes.pop("model", {})}
        return TrainingConfig.from_dict({**values, **changes})

    # -- validation --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(name, rule):
            raise ValueError(f"TrainingConfig.{name}={getattr(self, name)!r} is invalid: {rule}.")

        self._check_types()
        if self.dataset not in DATASET_NAMES:
            bad("dataset", f"allowed values are {DATASET_NAMES}")
        for name in ("num_epochs", "batch_size", "gradient_accumulation_steps", "logging_steps", "num_train_images"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        for name in (
            "max_steps",
            "checkpointing_steps",
            "checkpoints_total_limit",
            "stop_after_steps",
            "num_val_images",
        ):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                bad(name, "must be a positive integer or null")
        if self.eval_every_epochs < 0:
            bad("eval_every_epochs", "must be >= 0 (0 evaluates only at the end)")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.contrastive_weight < 0:
            bad("contrastive_weight", "must be >= 0 (0 disables the contrastive term)")
        if self.contrastive_warmup_steps < 0:
            bad("contrastive_warmup_steps", "must be >= 0 (0: constant lambda from the first step)")
        if self.temperature <= 0 or (self.base_temperature is not None and self.base_temperature <= 0):
            bad("temperature", "temperature and base_temperature must be > 0")
        if self.max_samples < 1 or self.max_views < 1:
            bad("max_samples", "max_samples and max_views must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", "must be in [0, 1)")
        if not isinstance(self.fold, int) or isinstance(self.fold, bool):
            bad("fold", "must be an integer fold index")
        if self.scale_range is not None:
            low_high = list(self.scale_range)
            if len(low_high) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in low_high):
                bad("scale_range", "must be [low, high] with 0 < low <= high, e.g. [0.5, 2.0], or null")
            if low_high[0] > low_high[1]:
                bad("scale_range", "must be [low, high] with low <= high")
        if not 0.0 <= self.color_jitter < 1.0:
            bad("color_jitter", "must be in [0, 1) (0 disables it)")
        _check_model(self.model)


_EXPECTED_TYPES = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a finite number"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "dict": ((dict,), "a mapping, e.g. {key: value}"),
    "list": ((list, tuple), "a list, e.g. [1, 2]"),
}


# The GFSSConfig fields a training YAML may set under `model:`; the others (class names, dataset, fold, the
# projection switch, label smoothing, the weights path) are derived from the run by `build_model`.
MODEL_KEYS = (
    "backbone",
    "backbone_kwargs",
    "backbone_pretrained",
    "image_mean",
    "image_std",
    "output_stride",
    "dilation_style",
    "hidden_size",
    "pool_scales",
    "ppm_align_corners",
    "dropout",
    "classifier_bias",
    "logits_align_corners",
    "image_size",
    "pad_mode",
    "projection_dim",
    "projection_source",
)


def model_defaults() -> dict[str, Any]:
    """
    GFSSConfig's defaults of the `MODEL_KEYS` (lists for tuples: the form a YAML file writes).

    Returns:
        `dict[str, Any]`: model key -> default, the values a `model:` mapping falls back to.
    """
    fields = {f.name: f for f in dataclasses.fields(GFSSConfig)}
    out = {}
    for name in MODEL_KEYS:
        default = fields[name].default
        if isinstance(default, tuple):
            default = list(default)
        elif default is None and name == "backbone_kwargs":
            default = {}
        out[name] = default
    return out


def _check_value(owner: str, name: str, annotation: str, value, default) -> None:
    """`value` has the type of `annotation` (a `Literal[...]` gives the allowed values) and floats are finite:
    `seed='abc'` or `temperature=.nan` fail here, naming the key, instead of deep inside training."""
    key = f"model.{name}" if owner.endswith(".model") else name
    example = f"--set {key}={json.dumps(default) if default is not None else 'VALUE'}"
    if annotation.startswith("Literal["):
        allowed = ast.literal_eval(f"({annotation[len('Literal[') : -1]},)")
        if value not in allowed:
            raise ValueError(
                f"{owner}.{name}={value!r} is invalid: allowed values are {list(allowed)}; e.g. {example}."
            )
        return
    kinds = [k.strip().split("[")[0] for k in annotation.split("|")]
    optional = "None" in kinds
    if value is None and optional:
        return
    base = next(k for k in kinds if k != "None")
    if base not in _EXPECTED_TYPES:
        return  # an annotation this check does not know: validate() has the field's own rule
    types, expected = _EXPECTED_TYPES[base]
    # A union of containers (`list[int] | tuple[int, ...]`) accepts any of them.
    types = tuple(t for k in kinds if k in _EXPECTED_TYPES for t in _EXPECTED_TYPES[k][0])
    if not isinstance(value, types) or (isinstance(value, bool) and base in ("int", "float")):
        raise ValueError(
            f"{owner}.{name}={value!r} is invalid: expected {expected}{' or null' if optional else ''}, "
            f"got {type(value).__name__}; e.g. {example}."
        )
    if base == "float" and not math.isfinite(value):
        raise ValueError(
            f"{owner}.{name}={value!r} is invalid: expected a finite number (NaN or infinity makes the loss and "
            f"every weight non-finite); e.g. {example}."
        )


def _check_field_types(config: TrainingConfig) -> None:
    """Each value has its field's annotated type (see `_check_value`)."""
    for f in dataclasses.fields(config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _check_value("TrainingConfig", f.name, str(f.type), getattr(config, f.name), default)


def _check_model(model: Mapping[str, Any]) -> None:
    """The `model` mapping: known keys, values of GFSSConfig's annotated types, then GFSSConfig's own rules."""
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(
            f"TrainingConfig.model has unknown key(s) {unknown}; valid keys are: {', '.join(MODEL_KEYS)} (class "
            "names, dataset and fold come from the run)."
        )
    fields = {f.name: f for f in dataclasses.fields(GFSSConfig)}
    defaults = model_defaults()
    for name, value in model.items():
        _check_value("TrainingConfig.model", name, str(fields[name].type), value, defaults[name])
    try:
        GFSSConfig(**as_model_kwargs(model))
    except (TypeError, ValueError) as err:
        raise ValueError(f"TrainingConfig.model is invalid: {err}") from err


def as_model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """
    The keyword arguments of [`GFSSConfig`] for a `model:` mapping: YAML lists become the tuples a config stores;
    the mapping itself stays as written.

    Args:
        model (`Mapping[str, Any]`): a [`TrainingConfig`]'s `model` mapping.
    """
    return {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}


def parse_overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """`["key=value", ...]` -> `{key: yaml.safe_load(value)}` (a mapping passes through, a single string is one
    override)."""
    if isinstance(overrides, Mapping):
        return dict(overrides)
    if isinstance(overrides, str):
        overrides = [overrides]  # not its characters
    out = {}
    for item in overrides:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. --set num_epochs=5).")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            problem = " ".join(str(getattr(err, "problem", None) or err).split())
            raise ValueError(
                f"override {item!r}: the value {value!r} of {key.strip()!r} is not valid YAML ({problem}); quote it or "
                "fix its syntax."
            ) from err
    return out


INFRASTRUCTURE_KEYS = (
    "output_dir",
    "cache_dir",
    "data_dir",
    "num_workers",
    "report_to",
    "logging_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "stop_after_steps",
    "eval_every_epochs",
)
"""[`TrainingConfig`] keys a resumed run may change: where files are read and written, how often the run logs,
evaluates and saves, and where it stops. They do not change the weights the run ends with. Every other key must
match the checkpoint's recorded config."""
