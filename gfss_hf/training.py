"""Base-class pre-training of a [`GFSSModel`] with Accelerate (the loop behind `scripts/pretrain.py`).

Loss (METHOD.md section 3): label-smoothed cross-entropy (RePRI convention) + `contrastive_weight` x the
pixel-to-pixel contrastive loss, whose sampled pixels of ALL processes form one contrast set. SGD (momentum 0.9,
weight decay 1e-4; AdamW as an option), cosine learning-rate decay per optimizer step, random horizontal flip
only.

Reproducibility: data order comes from Accelerate's seedable sampler (`seed + epoch`), flips from
`(seed, epoch, index)`, dropout and contrastive sampling from `(seed, step, process)`. A run resumed from a
checkpoint therefore continues with the batches, flips, dropout masks and samples of the uninterrupted run, and on
CPU ends with identical weights and the same logged losses (the running loss sums are checkpointed too).

Checkpoints (`checkpoints/checkpoint-N/`) hold only safetensors and JSON, so reading one cannot run code:
`model.safetensors`, `optimizer.safetensors` (optimizer and gradient scaler), `process_state_<rank>.safetensors` (RNG
states, running loss sums) and `trainer_state.json` (step, schedule, history and the run's resolved config). A resume
is refused when the checkpoint's config differs from the run's in any key but `INFRASTRUCTURE_KEYS`, and so is a new
run into an output folder that holds another run's checkpoints. A non-finite loss stops the run at that step.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from transformers.utils import logging

from ._io import apply_umask, atomic_write_text
from .configuration_gfss import GFSSConfig
from .conversion import load_backbone_weights
from .data.sources import DATASET_NAMES, build_view, check_data_dir, load_fold_split
from .data.splits import FoldSplit
from .hub import publish
from .image_processing_gfss import GFSSImageProcessor
from .losses import contrastive_loss_from_samples, count_contrastive_pairs, sample_contrastive_pixels
from .modeling_gfss import GFSSModel

logger = logging.get_logger(__name__)

__all__ = [
    "INFRASTRUCTURE_KEYS",
    "TrainingConfig",
    "PretrainingDataset",
    "build_model",
    "build_pretraining_datasets",
    "check_checkpoint_config",
    "cosine_schedule",
    "evaluate_base_miou",
    "find_last_checkpoint",
    "preflight",
    "pretrain",
    "read_trainer_state",
    "resolve_checkpoint",
]

_CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_PREFIX = "checkpoint-"
_TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainingConfig:
    r"""
    Every hyper-parameter of a pre-training run. Load it from YAML with [`TrainingConfig.from_yaml`]; unknown keys
    are an error that lists the valid ones.

    Args:
        dataset (`str`, defaults to `"synthetic"`): `"synthetic"` (embedded, no download), `"pascal5i"`,
            `"pascal10i"`, `"coco20i"` or `"folder"` (your own images + masks + classes.json).
        fold (`int`, defaults to 0): the fold whose base classes are trained (novel pixels are ignored).
        split_kind (`str`, *optional*): fold-table variant (COCO-20i: `"interleaved"` or `"consecutive"`).
        data_dir (`str`, *optional*): root of the data (not used by `"synthetic"`).
        cache_dir (`str`, *optional*): `datasets` cache of the builders (default: the Hugging Face cache).
        num_train_images (`int`, defaults to 1000): size of the synthetic train split.
        num_val_images (`int`, *optional*, defaults to 200): validation images (synthetic: the split size; other
            datasets: the first `num_val_images` of the val list; `None`: all).
        dataset_seed (`int`, defaults to 0): seed of the synthetic renderer.
        min_pixels (`int`, *optional*): base-training filter (an image needs a base class with this many pixels);
            `None` uses the builder's default (2,048 px; 64 px for the 96-px synthetic images).
        novel_to_background (`bool`, defaults to `False`): label novel pixels background instead of ignoring them.
        model (`dict`, defaults to `{}`): the architecture, passed to [`GFSSConfig`] as is: `backbone`,
            `backbone_kwargs`, `output_stride`, `dilation_style`, `hidden_size`, `pool_scales`, `dropout`,
            `image_size`, `pad_mode`, `projection_dim`, `projection_source`, ... Unset keys take GFSSConfig's
            defaults (the one place they are declared). The class lists, dataset and fold come from the run, the
            projection head from `contrastive_weight`. The flat keys of older configs (`backbone: resnet18` at the
            top level) are translated, with a warning.
        backbone_weights (`str`, *optional*): local file of ImageNet backbone weights
            ([`gfss_hf.conversion.load_backbone_weights`]).
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
        temperature (`float`, 0.1), base_temperature (`float`, *optional*), max_samples (`int`, 1024),
        max_views (`int`, 100), background_anchors (`bool`, `False`): the contrastive loss
            (see `gfss_hf.losses.contrastive_loss_from_samples`).
        hflip (`bool`, defaults to `True`): random horizontal flips (the only augmentation of the paper).
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
    temperature: float = 0.1
    base_temperature: float | None = None
    max_samples: int = 1024
    max_views: int = 100
    background_anchors: bool = False
    # loop
    hflip: bool = True
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
        return {**_model_defaults(), **self.model}

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
            raise ValueError(f"`model` in {source} must be a mapping of GFSSConfig fields (e.g. model: {{backbone: "
                             f"resnet18}}), got {type(model).__name__}.")
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
            raise ValueError(f"config file {str(path)!r} cannot be parsed as YAML ({problem}); fix its syntax.") from err
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
        for name in ("max_steps", "checkpointing_steps", "checkpoints_total_limit", "stop_after_steps", "num_val_images"):
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
        if self.temperature <= 0 or (self.base_temperature is not None and self.base_temperature <= 0):
            bad("temperature", "temperature and base_temperature must be > 0")
        if self.max_samples < 1 or self.max_views < 1:
            bad("max_samples", "max_samples and max_views must be >= 1")
        if not 0.0 <= self.label_smoothing < 1.0:
            bad("label_smoothing", "must be in [0, 1)")
        if not isinstance(self.fold, int) or isinstance(self.fold, bool):
            bad("fold", "must be an integer fold index")
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
MODEL_KEYS = ("backbone", "backbone_kwargs", "output_stride", "dilation_style", "hidden_size", "pool_scales",
              "ppm_align_corners", "dropout", "classifier_bias", "logits_align_corners", "image_size", "pad_mode",
              "projection_dim", "projection_source")  # fmt: skip


def _model_defaults() -> dict[str, Any]:
    """GFSSConfig's defaults of the `MODEL_KEYS` (lists for tuples: the form a YAML file writes)."""
    fields = {f.name: f for f in dataclasses.fields(GFSSConfig)}
    out = {}
    for name in MODEL_KEYS:
        default = fields[name].default
        out[name] = list(default) if isinstance(default, tuple) else ({} if default is None else default)
    return out


def _check_value(owner: str, name: str, annotation: str, value, default) -> None:
    """`value` has the type of `annotation` (a `Literal[...]` gives the allowed values) and floats are finite:
    `seed='abc'` or `temperature=.nan` fail here, naming the key, instead of deep inside training."""
    key = f"model.{name}" if owner.endswith(".model") else name
    example = f"--set {key}={json.dumps(default) if default is not None else 'VALUE'}"
    if annotation.startswith("Literal["):
        allowed = ast.literal_eval(f"({annotation[len('Literal['):-1]},)")
        if value not in allowed:
            raise ValueError(f"{owner}.{name}={value!r} is invalid: allowed values are {list(allowed)}; e.g. "
                             f"{example}.")
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
    defaults = _model_defaults()
    for name, value in model.items():
        _check_value("TrainingConfig.model", name, str(fields[name].type), value, defaults[name])
    try:
        GFSSConfig(**_as_model_kwargs(model))
    except (TypeError, ValueError) as err:
        raise ValueError(f"TrainingConfig.model is invalid: {err}") from err


def _as_model_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    # YAML lists become the tuples a config stores; the mapping itself stays as written.
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


# -- data ------------------------------------------------------------------------------------------------------
def _fold_split(config: TrainingConfig) -> FoldSplit:
    """The run's fold (a folder dataset's from its classes.json, after checking the folder's layout)."""
    return load_fold_split(config.dataset, config.fold, config.split_kind, config.data_dir)


class _LazySynthetic:
    """Builds the synthetic split on first use; pickles as its recipe (not the rendered images), so checkpoints of
    the data sampler and spawned workers stay small."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self._data = None

    @property
    def data(self):
        if self._data is None:
            from .data.synthetic import SyntheticSegmentation

            self._data = SyntheticSegmentation(**self.kwargs)
        return self._data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        return self.data[idx]

    def __getstate__(self):
        return {"kwargs": self.kwargs, "_data": None}


class PretrainingDataset(Dataset):
    r"""
    Training/validation samples for a [`GFSSModel`]: `{"pixel_values": (3, S, S) float32, "labels": (S, S) int64}`
    prepared by a [`GFSSImageProcessor`] (resize the longer side, pad, normalise; masks nearest, padded 255).

    Args:
        source: indexable of `{"image", "label"}` dicts (numpy arrays or PIL images), e.g. a `datasets.Dataset`.
        processor ([`GFSSImageProcessor`]): the preprocessing.
        label_map (`Callable`, *optional*): applied to each label array (e.g. `FoldSplit.to_base_training`).
        hflip (`bool`, *optional*, defaults to `False`): flip image and label horizontally with probability 0.5,
            decided by `numpy.random.default_rng([seed, epoch, index])` (reproducible, worker-independent).
        seed (`int`, *optional*, defaults to 0): seed of the flips.
        limit (`int`, *optional*): use only the first `limit` samples.
    """

    def __init__(self, source, processor: GFSSImageProcessor, label_map: Callable | None = None, hflip: bool = False,
                 seed: int = 0, limit: int | None = None):
        self.source = source
        self.processor = processor
        self.label_map = label_map
        self.hflip = hflip
        self.seed = int(seed)
        self.epoch = 0
        self.length = len(source) if limit is None else min(int(limit), len(source))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.source[int(index)]
        label = np.asarray(sample["label"])
        if self.label_map is not None:
            label = self.label_map(label)
        batch = self.processor(sample["image"], segmentation_maps=label, return_tensors="np")
        pixel_values, labels = batch["pixel_values"][0], batch["labels"][0]
        if self.hflip and np.random.default_rng([self.seed, self.epoch, int(index)]).random() < 0.5:
            pixel_values, labels = pixel_values[:, :, ::-1], labels[:, ::-1]
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }


def build_pretraining_datasets(config: TrainingConfig, split=None,
                               rebuild_data: bool = False) -> tuple[PretrainingDataset, PretrainingDataset]:
    """
    The base-training view (labels: background 0, base 1..B, novel 255 unless `novel_to_background`) and the
    validation view with the same label space, both prepared at `config.image_size`.

    Args:
        config ([`TrainingConfig`]): the run.
        split (`FoldSplit`, *optional*): the fold (default: the run's, `gfss_hf.data.sources.load_fold_split`).
        rebuild_data (`bool`, *optional*, defaults to `False`): regenerate the builders' prepared datasets instead of
            reusing their cache (`download_mode="force_redownload"`).

    Returns:
        `tuple(PretrainingDataset, PretrainingDataset)`: train (with flips when `config.hflip`) and val.
    """
    split = split if split is not None else _fold_split(config)
    processor = GFSSImageProcessor(image_size=config.image_size, pad_mode=config.pad_mode)
    val_map = lambda label: split.to_base_training(label, novel_to_background=config.novel_to_background)  # noqa: E731
    if config.dataset == "synthetic":
        kwargs = dict(image_size=max(config.image_size, 32), seed=config.dataset_seed, fold=config.fold)
        if config.min_pixels is not None:
            kwargs["min_pixels"] = config.min_pixels
        train_source = _LazySynthetic(split="train", num_images=config.num_train_images, view="base_train",
                                      novel_to_background=config.novel_to_background, **kwargs)
        val_source = _LazySynthetic(split="val", num_images=config.num_val_images or 200, view="full", **kwargs)
        len(train_source)  # renders and filters now, in the main process
    else:
        check_data_dir(config.dataset, config.data_dir)
        # Builders key their cache by config (the folder builder also by a fingerprint of its files); rebuild_data
        # regenerates it regardless, for edits a fingerprint cannot see.
        views = {view: build_view(config.dataset, view, fold=config.fold, data_dir=config.data_dir,
                                  cache_dir=config.cache_dir, split_kind=config.split_kind,
                                  min_pixels=config.min_pixels, novel_to_background=config.novel_to_background,
                                  rebuild=rebuild_data)
                 for view in ("base_train", "val")}  # fmt: skip
        train_source, val_source = views["base_train"], views["val"]
    if len(train_source) == 0:
        raise ValueError(
            f"the base-training view of {config.dataset!r} fold {config.fold} is empty: no image has a base class "
            f"with >= min_pixels pixels; lower min_pixels or check data_dir."
        )
    train = PretrainingDataset(train_source, processor, hflip=config.hflip, seed=config.seed)
    val = PretrainingDataset(val_source, processor, label_map=val_map, limit=config.num_val_images)
    return train, val


# -- model -----------------------------------------------------------------------------------------------------
def build_model(config: TrainingConfig, split=None) -> GFSSModel:
    """
    A [`GFSSModel`] with the fold's base classes (`[background, base...]` rows), initialised from `config.seed`
    (the global RNG is forked, not touched), with ImageNet backbone weights when `config.backbone_weights` is set.
    The projection head exists only when `contrastive_weight > 0`.
    """
    split = split if split is not None else _fold_split(config)
    model_config = GFSSConfig(
        **_as_model_kwargs(config.model),
        use_projection=config.contrastive_weight > 0,
        label_smoothing=config.label_smoothing,
        base_class_names=split.base_names,
        dataset=split.dataset,
        fold=split.fold,
        split_kind=split.split_kind,
        backbone_weights_path=config.backbone_weights,
    )
    # Module initialisers draw from the global RNG; fork it so that building a model neither depends on nor
    # changes the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GFSSModel(model_config)
    if config.backbone_weights:
        load_backbone_weights(model, config.backbone_weights)
    return model


def cosine_schedule(total_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: `0.5 * (1 + cos(pi * step / total_steps))` (or 1 for constant)."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


# -- checkpoints -----------------------------------------------------------------------------------------------
# Every file of a checkpoint is safetensors or JSON: neither format can run code when read, so a checkpoint folder
# received from elsewhere (or tampered with) is at worst refused, never executed. Accelerate's save_state would
# write the optimizer, RNG and registered objects with torch.save (pickle), so the loop saves its own state.
_CHECKPOINT_FORMAT = 2
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_PROCESS_FILE = "process_state_{rank}.safetensors"
_STRUCTURE_KEY = "gfss_structure"

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


def _checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{_CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() and (path / _TRAINER_STATE).is_file() else None


def find_last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `output_dir/checkpoints`, or None."""
    folder = Path(output_dir) / _CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    found = [(step, p) for p in folder.iterdir() if (step := _checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def resolve_checkpoint(resume_from_checkpoint: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path | None:
    """
    `"latest"` -> the last checkpoint of `output_dir`; a path -> that checkpoint (or the last one inside it when it
    is an output folder). Raises before any training when nothing resumable is there.
    """
    if resume_from_checkpoint in (None, ""):
        return None
    if str(resume_from_checkpoint) == "latest":
        found = find_last_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint in {str(Path(output_dir) / _CHECKPOINT_DIR)!r}; "
                "train with --checkpointing_steps N first, or start without --resume_from_checkpoint."
            )
        return found
    path = Path(resume_from_checkpoint)
    if path.is_dir() and (path / _TRAINER_STATE).is_file():
        return path
    if path.is_dir() and (found := find_last_checkpoint(path)) is not None:
        return found
    raise FileNotFoundError(
        f"--resume_from_checkpoint {str(path)!r} is not a checkpoint (no {_TRAINER_STATE}) and holds none under "
        f"{_CHECKPOINT_DIR}/; give a {_CHECKPOINT_DIR}/{_CHECKPOINT_PREFIX}N folder, an output folder, or 'latest'."
    )


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"checkpoint file {str(path)!r} cannot be read ({type(err).__name__}: {err}); it is truncated, corrupt or not "
        "a gfss_hf checkpoint file. Resume from an earlier checkpoint (--resume_from_checkpoint PATH) or start a "
        "fresh run in a new --output_dir."
    )


def read_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The `trainer_state.json` of a checkpoint, with an error naming the file when it is not readable JSON."""
    path = Path(checkpoint) / _TRAINER_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _unreadable(path, err) from err
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise _unreadable(path, ValueError("no integer 'global_step'"))
    return state


def _config_for_comparison(config: TrainingConfig | Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so that tuples and lists (and ints written as floats) compare as they are stored. The model is
    # compared key by key with defaults filled in: `model: {}` and an explicit default are the same run, and a
    # checkpoint of an older version (flat model keys) compares with the translated form.
    values = config.to_dict() if isinstance(config, TrainingConfig) else dict(config)
    values = TrainingConfig.translate_flat_model_keys(values, "the checkpoint's config")
    model = {**_model_defaults(), **values.pop("model", {})}
    values.update({f"model.{k}": v for k, v in model.items()})
    return {k: v for k, v in json.loads(json.dumps(values)).items() if k not in INFRASTRUCTURE_KEYS}


def check_checkpoint_config(checkpoint: str | os.PathLike, config: TrainingConfig, resuming: bool = True) -> None:
    """
    Raise a `ValueError` when `checkpoint` was written by a run whose settings differ from `config` in anything but
    [`INFRASTRUCTURE_KEYS`]; the message names every differing key with both values and says how to start fresh.

    Args:
        checkpoint (`str` or `os.PathLike`): a `checkpoints/checkpoint-N` folder.
        config ([`TrainingConfig`]): the run about to start.
        resuming (`bool`, *optional*, defaults to `True`): `False` when a new run would write into the folder that
            holds `checkpoint` (the message then says so).
    """
    checkpoint = Path(checkpoint)
    state = read_trainer_state(checkpoint)
    output_dir = checkpoint.parent.parent
    fresh = (
        f"To start a fresh run, use a new --output_dir or delete {str(output_dir / _CHECKPOINT_DIR)!r}"
        + ("" if resuming else ", or resume it with --resume_from_checkpoint latest and its settings")
        + "."
    )
    what = f"checkpoint {str(checkpoint)!r}" if resuming else (
        f"output_dir {str(output_dir)!r} already holds checkpoints ({checkpoint.name}) of another run, which"
    )
    if state.get("format") != _CHECKPOINT_FORMAT or not isinstance(state.get("config"), dict):
        raise ValueError(
            f"{what} was written by an older gfss_hf (no recorded config; its optimizer and RNG states are "
            f"pickles, which this version does not load because unpickling can run code). {fresh}"
        )
    saved, current = _config_for_comparison(state["config"]), _config_for_comparison(config)
    differences = [
        f"{key}: checkpoint {saved.get(key, '<absent>')!r}, this run {current.get(key, '<absent>')!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key, "<absent>") != current.get(key, "<absent>")
    ]
    if differences:
        verb = "was taken by a run with other settings" if resuming else "has other settings"
        raise ValueError(
            f"{what} {verb}: {'; '.join(differences)}. Only {', '.join(INFRASTRUCTURE_KEYS)} may change on resume. "
            f"Resume with the checkpoint's settings (its training_config.yaml), or start fresh. {fresh}"
        )


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """A JSON-able description of `obj` whose tensors (and numpy arrays) go into `tensors`."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        # Stored as int64/float64 tensors plus the dtype: safetensors has no uint32 (numpy's RNG state).
        key = f"t{len(tensors)}"
        wide = obj.astype(np.float64 if obj.dtype.kind == "f" else np.int64)
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide))
        return {"__ndarray__": key, "dtype": obj.dtype.str}
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{where} is a {type(obj).__name__}, which a checkpoint cannot store (tensors and plain values).")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if "__tensor__" in node:
        return tensors[node["__tensor__"]]
    if "__ndarray__" in node:
        return tensors[node["__ndarray__"]].numpy().astype(np.dtype(node["dtype"]))
    if "__tuple__" in node:
        return tuple(_decode(v, tensors) for v in node["__tuple__"])
    return {_decode(k, tensors): _decode(v, tensors) for k, v in node["__dict__"]}


def _write_file(path: Path, data: bytes) -> None:
    """The one place checkpoint bytes reach the disk (tests simulate a full disk here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_state_file(path: Path, obj: Any) -> None:
    """`obj` (nested dicts, lists, tuples, scalars, tensors, numpy arrays) as safetensors with its structure as JSON
    metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    structure = json.dumps(_encode(obj, tensors, path.stem))
    _write_file(path, save(tensors, metadata={_STRUCTURE_KEY: structure}))


def _read_state_file(path: Path) -> Any:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint file {str(path)!r} is missing; the checkpoint is incomplete. Resume from another checkpoint "
            "or start a fresh run in a new --output_dir."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            structure = json.loads((fh.metadata() or {})[_STRUCTURE_KEY])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        return _decode(structure, tensors)
    except Exception as err:  # safetensors raises its own error types for bad headers and short files
        raise _unreadable(path, err) from err


def _checkpoint_write_error(path: Path, err: OSError) -> OSError:
    if err.errno == errno.ENOSPC:
        return OSError(
            errno.ENOSPC,
            f"no space left on device while writing checkpoint file {str(path)!r}; the partial checkpoint was "
            "removed and the previous checkpoints are intact. Free disk space (or lower checkpoints_total_limit) "
            "and resume with --resume_from_checkpoint latest.",
        )
    return OSError(err.errno, f"writing checkpoint file {str(path)!r} failed: {err.strerror or err}")


def _save_checkpoint(accelerator, output_dir: Path, state: dict, total_limit: int | None, model, optimizer,
                     process_state: dict) -> Path:
    """
    Write a checkpoint into a temporary folder, then rename it: a killed process never leaves a half checkpoint
    that `latest` would pick. Files: `model.safetensors` (weights), `optimizer.safetensors` (optimizer and
    gradient-scaler state), `process_state_<rank>.safetensors` (each process's RNG states and running loss sums)
    and `trainer_state.json` (step, schedule, history, the run's config).
    """
    folder = output_dir / _CHECKPOINT_DIR
    final = folder / f"{_CHECKPOINT_PREFIX}{state['global_step']}"
    tmp = folder / f".tmp-{_CHECKPOINT_PREFIX}{state['global_step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    target = tmp / _PROCESS_FILE.format(rank=accelerator.process_index)
    try:
        _write_state_file(target, process_state)
        if accelerator.is_main_process:
            from safetensors.torch import save

            target = tmp / _MODEL_FILE
            # A plain state dict (parameter names as keys), readable by any safetensors tool. Cloned: safetensors
            # refuses tensors that share storage.
            weights = {k: v.detach().to("cpu").contiguous().clone()
                       for k, v in accelerator.unwrap_model(model).state_dict().items()}
            _write_file(target, save(weights, metadata={"format": "pt"}))
            target = tmp / _OPTIMIZER_FILE
            scaler = getattr(accelerator, "scaler", None)
            _write_state_file(target, {"optimizer": optimizer.state_dict(),
                                       "scaler": scaler.state_dict() if scaler is not None else None})
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _checkpoint_write_error(target, err) from err
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        target = tmp / _TRAINER_STATE
        try:
            _write_file(target, json.dumps(state, indent=2, sort_keys=True).encode("utf-8"))
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise _checkpoint_write_error(target, err) from err
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if total_limit is not None:
            existing = sorted((s, p) for p in folder.iterdir() if (s := _checkpoint_step(p)) is not None)
            for _, old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler, gradient scaler and this process's RNG states from `checkpoint`
    (safetensors and JSON only); returns the trainer state and this process's state."""
    from safetensors.torch import load_file

    trainer_state = read_trainer_state(checkpoint)
    path = checkpoint / _MODEL_FILE
    if not path.is_file():
        raise _unreadable(path, FileNotFoundError("the file is missing"))
    try:
        accelerator.unwrap_model(model).load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except Exception as err:  # safetensors' own errors for short or foreign files, torch's for mismatched keys
        raise _unreadable(path, err) from err
    saved = _read_state_file(checkpoint / _OPTIMIZER_FILE)
    try:
        optimizer.load_state_dict(saved["optimizer"])
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and saved.get("scaler") is not None:
            scaler.load_state_dict(saved["scaler"])
        scheduler.load_state_dict(trainer_state["scheduler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _unreadable(checkpoint / _OPTIMIZER_FILE, err) from err
    process = _read_state_file(checkpoint / _PROCESS_FILE.format(rank=accelerator.process_index))
    try:
        rng = process["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _unreadable(checkpoint / _PROCESS_FILE.format(rank=accelerator.process_index), err) from err
    accelerator.step = int(trainer_state.get("accelerator_step", 0))
    return {"trainer_state": trainer_state, "process": process}


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# -- evaluation ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_base_miou(model, dataloader, accelerator, num_classes: int, ignore_index: int = 255) -> dict[str, float]:
    """
    Pooled mIoU of the (B+1)-way model on a validation view (labels: background 0, base 1..B, 255 ignored), at the
    canvas resolution, summed over all processes.

    Returns:
        `dict` with `base_miou` (classes 1..B), `miou` (background included) and `pixel_accuracy`.
    """
    from .metrics import PooledIoU

    metric = PooledIoU(num_classes=num_classes, ignore_index=ignore_index)
    was_training = model.training
    model.eval()
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        per_image = metric.episode_confusion(logits.argmax(1), batch["labels"])
        # gather_for_metrics drops the samples repeated to even out the last batch across processes.
        metric.add_confusion(accelerator.gather_for_metrics(per_image).cpu())
    model.train(was_training)
    confusion = metric.confusion.double()
    return {
        "base_miou": metric.mean_iou(list(range(1, num_classes))),
        "miou": metric.mean_iou(),
        "pixel_accuracy": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
    }


# -- the loop --------------------------------------------------------------------------------------------------
def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _tracker(report_to: str) -> str | None:
    if report_to == "none":
        return None
    if report_to != "auto":
        return report_to
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        return "tensorboard"
    return None


def preflight(config: TrainingConfig, resume_from_checkpoint=None, push_to_hub: bool = False,
              hub_model_id: str | None = None):
    """
    Check everything that can be wrong with a run's inputs before any model is built or batch read: the config
    values, the fold, the data folder layout, the resume checkpoint and the Hub target.

    Returns:
        `tuple(FoldSplit, Path | None)`: the fold and the checkpoint to resume from.
    """
    config.validate()
    if push_to_hub and not hub_model_id:
        raise ValueError("push_to_hub=True needs hub_model_id (e.g. 'user/gfss-pspnet-pascal5i-fold0').")
    split = _fold_split(config)
    check_data_dir(config.dataset, config.data_dir)
    checkpoint = resolve_checkpoint(resume_from_checkpoint, config.output_dir)
    if checkpoint is not None:
        check_checkpoint_config(checkpoint, config)
    elif (existing := find_last_checkpoint(config.output_dir)) is not None:
        # A new run would write its checkpoints and logs beside another run's, and `latest` would mix them.
        check_checkpoint_config(existing, config, resuming=False)
    return split, checkpoint


def pretrain(
    config: TrainingConfig,
    resume_from_checkpoint: str | os.PathLike | None = None,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    rebuild_data: bool = False,
) -> dict[str, Any]:
    r"""
    Pre-train a [`GFSSModel`] on the base classes of `config.dataset` / `config.fold` with Accelerate.

    Works in one process and under `accelerate launch` (DDP; on CPU `--multi_gpu --num_processes 2` gives a real
    2-process gloo group). All inputs (fold, data layout, resume folder) are checked before the model is built.

    Args:
        config ([`TrainingConfig`]): the run.
        resume_from_checkpoint (`str`, *optional*): `"latest"` or a checkpoint path; the run continues exactly where
            that checkpoint was taken (same batches, flips, dropout and samples).
        push_to_hub (`bool`, *optional*, defaults to `False`): publish the final model with
            [`gfss_hf.hub.publish`] (needs `hub_model_id`): a staged, checked export is uploaded, never the output
            folder itself (its checkpoints and logs stay home).
        hub_model_id (`str`, *optional*): target repo, e.g. `"user/gfss-pspnet-pascal5i-fold0"`.
        hub_token (`str`, *optional*): token for the upload (default: the logged-in one).
        rebuild_data (`bool`, *optional*, defaults to `False`): rebuild the prepared dataset cache (see
            [`build_pretraining_datasets`]).

    Returns:
        `dict` with `global_step`, `completed` (False when stopped by `stop_after_steps`), `history` (one record per
        logging step), `eval` (per evaluation), `final_eval`, `output_dir` and `checkpoint` (the last one saved).

    Output folder: `config.json` + `model.safetensors` + `preprocessor_config.json` (loadable by
    `AutoModel.from_pretrained` once `gfss_hf` is imported), `training_config.yaml`, `train_log.jsonl`,
    `eval_results.json`, and `checkpoints/checkpoint-N/` when checkpointing (safetensors + JSON, see the module
    docstring).

    Raises:
        `ValueError`: bad inputs, found before the model is built (config values, fold, data layout, a checkpoint
            or output folder of a run with other settings, an unreadable checkpoint file).
        `FloatingPointError`: the loss became NaN or infinite (the message names the step); nothing is saved.
        `OSError`: a checkpoint file could not be written (named; "no space left on device" on a full disk).

    Example:

    ```python
    >>> config = TrainingConfig.from_yaml("scripts/configs/synthetic.yaml", overrides={"max_steps": 20})
    >>> summary = pretrain(config)
    >>> summary["final_eval"]["base_miou"]
    ```
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
    from tqdm.auto import tqdm

    output_dir = Path(config.output_dir)
    split, checkpoint = preflight(config, resume_from_checkpoint, push_to_hub, hub_model_id)

    tracker = _tracker(config.report_to)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    logger.info(f"pre-training on {world} process(es), device {accelerator.device}")

    with accelerator.main_process_first():
        train_set, val_set = build_pretraining_datasets(config, split, rebuild_data=rebuild_data)
    model = build_model(config, split)
    num_classes = model.config.num_labels
    if torch.cuda.is_available() and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    train_loader = DataLoader(
        train_set, batch_size=config.batch_size, shuffle=True, drop_last=len(train_set) >= config.batch_size * world,
        num_workers=config.num_workers,
    )
    val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = config.max_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    # Not prepared: a prepared scheduler steps once per process per call. This one steps once per optimizer step
    # and is saved in the checkpoints through register_for_checkpointing.
    # It is saved in the checkpoints' trainer_state.json (not registered for Accelerate's pickled checkpointing).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_steps, config.lr_schedule))

    global_step, history, evals = 0, [], []
    running = torch.zeros(3, device=accelerator.device)  # loss, ce, contrastive summed over micro-batches
    running_count = 0
    if checkpoint is not None:
        restored = _load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
        trainer_state = restored["trainer_state"]
        global_step = int(trainer_state["global_step"])
        history, evals = trainer_state.get("history", []), trainer_state.get("eval", [])
        if trainer_state.get("steps_per_epoch") != steps_per_epoch or trainer_state.get("total_steps") != total_steps:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} was taken with {trainer_state.get('steps_per_epoch')} steps per "
                f"epoch and {trainer_state.get('total_steps')} steps in all, this run has {steps_per_epoch} and "
                f"{total_steps}; resume with the same data, batch size, accumulation and number of processes."
            )
        accelerator.print(f"resuming from {checkpoint} (step {global_step})")
        # The loss sums since the last logged step: the next logged average then matches the uninterrupted run.
        running = restored["process"]["running"].to(accelerator.device)
        running_count = int(restored["process"]["running_count"])

    unwrapped = accelerator.unwrap_model(model)
    use_contrastive = config.contrastive_weight > 0
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "training_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    if tracker is not None:
        accelerator.init_trackers("gfss_pretrain", config={k: v for k, v in config.to_dict().items()
                                                           if isinstance(v, (int, float, str, bool))})
    log_path = output_dir / "train_log.jsonl"
    if checkpoint is not None and accelerator.is_main_process and log_path.is_file():
        # A killed run may have logged steps past its last checkpoint; the resumed run logs them again.
        kept = [line for line, record in _read_log(log_path) if record["step"] <= global_step]
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    elif checkpoint is None and accelerator.is_main_process and log_path.is_file():
        atomic_write_text(log_path, "")  # a new run does not append to a previous run's log
    progress = tqdm(total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process,
                    desc="pre-training")
    device_type = accelerator.device.type
    fork_devices = [accelerator.device.index or 0] if device_type == "cuda" else []
    completed = True
    last_checkpoint = checkpoint
    start_epoch = global_step // steps_per_epoch
    model.train()

    def state_dict_for_checkpoint():
        return {"format": _CHECKPOINT_FORMAT, "global_step": global_step, "steps_per_epoch": steps_per_epoch,
                "total_steps": total_steps, "world_size": world, "history": history, "eval": evals,
                "scheduler": scheduler.state_dict(), "accelerator_step": accelerator.step,
                "config": config.to_dict()}

    for epoch in range(start_epoch, num_epochs):
        if global_step >= total_steps:
            break
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        skip = (global_step - epoch * steps_per_epoch) * config.gradient_accumulation_steps
        active = accelerator.skip_first_batches(train_loader, skip) if skip > 0 else train_loader
        micro = 0
        for batch in active:
            with accelerator.accumulate(model):
                # Dropout draws from the global RNG: seed it per (seed, step, micro-batch, process) inside a fork,
                # so a resumed run draws the masks of the uninterrupted one.
                with torch.random.fork_rng(devices=fork_devices, device_type=device_type):
                    torch.manual_seed(_step_seed(config.seed, global_step, micro, rank))
                    outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"],
                                    output_embeddings=use_contrastive)
                ce = outputs.loss
                if use_contrastive:
                    contrastive = _contrastive_term(unwrapped, outputs, batch["labels"], config, accelerator,
                                                    _step_seed(config.seed, global_step, micro, rank, 1))
                    loss = ce + config.contrastive_weight * contrastive
                else:
                    contrastive = torch.zeros((), device=ce.device)
                    loss = ce
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            # The contrastive value of a process is scaled by the world size (see contrastive_loss_from_samples);
            # its mean over processes is the global loss.
            running += torch.stack([loss.detach().float(), ce.detach().float(), contrastive.detach().float()])
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            _check_finite(running, running_count, global_step + 1, accelerator, last_checkpoint)
            scheduler.step()
            global_step += 1
            micro = 0
            progress.update(1)
            if global_step % config.logging_steps == 0 or global_step == total_steps:
                values = (accelerator.reduce(running, reduction="mean") / running_count).tolist()
                record = {"step": global_step, "epoch": epoch, "loss": values[0], "ce": values[1],
                          "contrastive": values[2], "lr": scheduler.get_last_lr()[0]}
                history.append(record)
                running.zero_()
                running_count = 0
                progress.set_postfix(loss=f"{values[0]:.4f}")
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
            end_of_epoch = global_step % steps_per_epoch == 0
            if end_of_epoch and config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0 \
                    and global_step < total_steps:
                result = {"step": global_step, "epoch": epoch + 1,
                          **evaluate_base_miou(model, val_loader, accelerator, num_classes)}
                evals.append(result)
                accelerator.log({f"val/{k}": v for k, v in result.items() if k not in ("step", "epoch")},
                                step=global_step)
                logger.info(f"epoch {epoch + 1}: {result}")
            stop = config.stop_after_steps is not None and global_step >= config.stop_after_steps
            if (config.checkpointing_steps and global_step % config.checkpointing_steps == 0) or \
                    (stop and global_step < total_steps):
                last_checkpoint = _save_checkpoint(
                    accelerator, output_dir, state_dict_for_checkpoint(), config.checkpoints_total_limit, model,
                    optimizer, {"rng": _rng_state(), "running": running, "running_count": running_count},
                )
            if global_step >= total_steps:
                break
            if stop:
                completed = False
                break
        if not completed:
            break
    progress.close()

    summary = {"global_step": global_step, "completed": completed, "history": history, "eval": evals,
               "output_dir": str(output_dir), "checkpoint": str(last_checkpoint) if last_checkpoint else None,
               "world_size": world}
    if completed:
        final = evaluate_base_miou(model, val_loader, accelerator, num_classes)
        summary["final_eval"] = final
        accelerator.log({f"val/{k}": v for k, v in final.items()}, step=global_step)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_final(accelerator.unwrap_model(model), output_dir, summary, config)
            if push_to_hub:
                summary["hub_commit"] = publish(output_dir, hub_model_id, token=hub_token)["commit_url"]
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _check_finite(running: torch.Tensor, count: int, step: int, accelerator, last_checkpoint) -> None:
    """Stop at the first optimizer step whose loss is NaN or infinite (on any process): the weights are already
    poisoned, and every later step, checkpoint and the final model would carry it silently."""
    bad = (~torch.isfinite(running)).any().float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() == 0:
        return
    values = (running / max(count, 1)).tolist()
    raise FloatingPointError(
        f"the training loss became non-finite at step {step} (loss={values[0]}, ce={values[1]}, "
        f"contrastive={values[2]} on process {accelerator.process_index}); training stopped without saving. Lower "
        "learning_rate, check temperature / contrastive_weight / mixed_precision and the data, then "
        + (f"resume from {str(last_checkpoint)!r} or " if last_checkpoint else "")
        + "start a fresh run."
    )


def _read_log(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of each line of a JSON-lines log; a torn last line (a run killed mid-write) is dropped with a
    warning, a bad line elsewhere is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as err:
            if number == len(lines):
                logger.warning(f"dropped the partial last line {number} of {path} ({line[:80]!r}): a run was "
                               "stopped while writing it; the resumed run logs that step again")
                break
            raise ValueError(
                f"line {number} of {str(path)!r} is not a log record ({err}): {line[:80]!r}; fix or delete the line "
                "(or the file) and resume again."
            ) from err
        out.append((line, record))
    return out


def _contrastive_term(model: GFSSModel, outputs, labels: torch.Tensor, config: TrainingConfig, accelerator,
                      seed: int) -> torch.Tensor:
    """Sample on this process with the GLOBAL pair count, then contrast against the samples of every process."""
    embeddings = outputs.embeddings
    size = embeddings.shape[-2:]
    with torch.no_grad():
        # Predictions at the feature resolution (the decoder keeps the backbone's size, so this is also the size of
        # backbone-sourced embeddings) decide hard (mispredicted) vs easy views.
        predictions = model.classifier(outputs.features.to(model.classifier.weight.dtype)).argmax(1)
    num_pairs = count_contrastive_pairs(labels, size, max_views=config.max_views, ignore_index=model.config.ignore_index)
    if accelerator.num_processes > 1:
        num_pairs = int(accelerator.reduce(torch.tensor(num_pairs, device=labels.device), reduction="sum").item())
    generator = torch.Generator().manual_seed(seed)
    x, y = sample_contrastive_pixels(
        embeddings, labels, predictions, max_samples=config.max_samples, max_views=config.max_views,
        ignore_index=model.config.ignore_index, num_pairs=num_pairs, generator=generator,
    )
    return contrastive_loss_from_samples(
        x, y, temperature=config.temperature, base_temperature=config.base_temperature, background_index=0,
        background_anchors=config.background_anchors, gather=accelerator.num_processes > 1,
    )


def _save_final(model: GFSSModel, output_dir: Path, summary: dict, config: TrainingConfig) -> None:
    model.save_pretrained(str(output_dir))
    for weights in output_dir.glob("*.safetensors"):
        apply_umask(weights)  # safetensors (0.8) creates its files 0600, unlike a plain write
    GFSSImageProcessor.from_config(model.config).save_pretrained(str(output_dir))
    results = {"global_step": summary["global_step"], "final_eval": summary["final_eval"], "eval": summary["eval"],
               "dataset": config.dataset, "fold": config.fold, "world_size": summary["world_size"],
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(output_dir / "eval_results.json", json.dumps(results, indent=2))
