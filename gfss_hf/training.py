"""Base-class pre-training of a [`GFSSModel`] with Accelerate (the loop behind `scripts/pretrain.py`).

Loss (METHOD.md section 3): label-smoothed cross-entropy (RePRI convention) + `contrastive_weight` x the
pixel-to-pixel contrastive loss, whose sampled pixels of ALL processes form one contrast set. SGD (momentum 0.9,
weight decay 1e-4; AdamW as an option), cosine learning-rate decay per optimizer step, random horizontal flip
only.

Reproducibility: data order comes from Accelerate's seedable sampler (`seed + epoch`), flips from
`(seed, epoch, index)`, dropout and contrastive sampling from `(seed, step, process)`. A run resumed from a
checkpoint therefore continues with the batches, flips, dropout masks and samples of the uninterrupted run, and on
CPU ends with identical weights and the same logged losses (the running loss sums are checkpointed too).

The run's settings are a [`gfss_hf.training_config.TrainingConfig`]; its checkpoints (`checkpoints/checkpoint-N/`,
safetensors and JSON only, refused on resume when the settings differ) are written and read by
[`gfss_hf.checkpointing`]. A non-finite loss stops the run at that step.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset
from transformers.utils import logging

from ._io import apply_umask, atomic_write_text
from .checkpointing import (
    check_checkpoint_config,
    find_last_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
)
from .configuration_gfss import GFSSConfig
from .conversion import backbone_normalization, fetch_backbone_weights, load_backbone_weights
from .data.sources import build_view, check_data_dir, load_fold_split
from .data.splits import FoldSplit
from .hub import publish
from .image_processing_gfss import GFSSImageProcessor
from .losses import contrastive_loss_from_samples, count_contrastive_pairs, sample_contrastive_pixels
from .modeling_gfss import GFSSModel
from .training_config import TrainingConfig, as_model_kwargs

logger = logging.get_logger(__name__)

__all__ = [
    "PretrainingDataset",
    "build_model",
    "build_pretraining_datasets",
    "cosine_schedule",
    "evaluate_base_miou",
    "preflight",
    "pretrain",
]


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
        hflip (`bool`, *optional*, defaults to `False`): flip image and label horizontally with probability 0.5.
        scale_range (`tuple[float, float]`, *optional*): rescale the prepared sample by a factor uniform in the range
            (image bilinear, label nearest), then crop or pad (image 0, the normalised mean colour; label 255) back to
            the canvas at a uniform random offset.
        color_jitter (`float`, *optional*, defaults to 0): brightness, contrast and saturation factors uniform in
            `[1 - color_jitter, 1 + color_jitter]`, applied to the RGB image before preprocessing (labels unchanged).
        seed (`int`, *optional*, defaults to 0): seed of the augmentations. Every random draw of a sample comes from
            one `numpy.random.default_rng([seed, epoch, index])` (reproducible, worker-independent), the flip first,
            so that enabling the other augmentations leaves the flips of a run unchanged.
        limit (`int`, *optional*): use only the first `limit` samples.
    """

    def __init__(
        self,
        source,
        processor: GFSSImageProcessor,
        label_map: Callable | None = None,
        hflip: bool = False,
        seed: int = 0,
        limit: int | None = None,
        scale_range: tuple[float, float] | None = None,
        color_jitter: float = 0.0,
    ):
        self.source = source
        self.processor = processor
        self.label_map = label_map
        self.hflip = hflip
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.color_jitter = float(color_jitter)
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
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        flip = rng.random() < 0.5  # drawn first and always: the flips do not depend on the other options
        image = sample["image"]
        if self.color_jitter > 0:
            image = _jitter_colours(
                np.asarray(image.convert("RGB") if hasattr(image, "convert") else image), rng, self.color_jitter
            )
        batch = self.processor(image, segmentation_maps=label, return_tensors="np")
        pixel_values, labels = batch["pixel_values"][0], batch["labels"][0]
        if self.scale_range is not None:
            pixel_values, labels = _scale_and_crop(pixel_values, labels, rng, self.scale_range)
        if self.hflip and flip:
            pixel_values, labels = pixel_values[:, :, ::-1], labels[:, ::-1]
        return {
            "pixel_values": torch.from_numpy(np.ascontiguousarray(pixel_values)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }


def _jitter_colours(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation (factors uniform in `[1 - strength, 1 + strength]`), uint8 RGB."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    out = image.astype(np.float32) * brightness
    grey = out @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    out = (out - grey.mean()) * contrast + grey.mean()
    grey = (out @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    out = (out - grey) * saturation + grey
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _scale_and_crop(
    pixel_values: np.ndarray, labels: np.ndarray, rng: np.random.Generator, scale_range: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale a prepared `(3, S, S)` image and its `(S, S)` label by a random factor, then crop or pad back to S."""
    size = labels.shape[-1]
    factor = rng.uniform(*scale_range)
    side = max(1, int(round(size * factor)))
    image = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(pixel_values))[None],
        size=(side, side),
        mode="bilinear",
        align_corners=False,
    )[0].numpy()
    label = (
        torch.nn.functional.interpolate(
            torch.from_numpy(np.ascontiguousarray(labels)).float()[None, None], size=(side, side), mode="nearest"
        )[0, 0]
        .numpy()
        .astype(labels.dtype)
    )
    # One offset range for both cases: crop when the rescaled sample is larger, paste into a padded canvas otherwise.
    top, left = (int(rng.integers(0, abs(side - size) + 1)) for _ in range(2))
    if side >= size:
        return image[:, top : top + size, left : left + size], label[top : top + size, left : left + size]
    out_image = np.zeros((image.shape[0], size, size), dtype=image.dtype)
    out_label = np.full((size, size), 255, dtype=labels.dtype)
    out_image[:, top : top + side, left : left + side] = image
    out_label[top : top + side, left : left + side] = label
    return out_image, out_label


def build_pretraining_datasets(
    config: TrainingConfig, split=None, rebuild_data: bool = False
) -> tuple[PretrainingDataset, PretrainingDataset]:
    """
    The base-training view (labels: background 0, base 1..B, novel 255 unless `novel_to_background`) and the
    validation view with the same label space, both prepared at `config.image_size`.

    Args:
        config ([`TrainingConfig`]): the run.
        split (`FoldSplit`, *optional*): the fold (default: the run's, `gfss_hf.data.sources.load_fold_split`).
        rebuild_data (`bool`, *optional*, defaults to `False`): regenerate the builders' prepared datasets instead of
            reusing their cache (`download_mode="force_redownload"`).

    Returns:
        `tuple(PretrainingDataset, PretrainingDataset)`: train (with the augmentations of `config`: `hflip`,
        `scale_range`, `color_jitter`) and val (none).
    """
    split = split if split is not None else _fold_split(config)
    processor = GFSSImageProcessor.from_config(GFSSConfig(**model_config_kwargs(config)))
    val_map = lambda label: split.to_base_training(label, novel_to_background=config.novel_to_background)  # noqa: E731
    if config.dataset == "synthetic":
        kwargs = dict(image_size=max(config.image_size, 32), seed=config.dataset_seed, fold=config.fold)
        if config.min_pixels is not None:
            kwargs["min_pixels"] = config.min_pixels
        train_source = _LazySynthetic(
            split="train",
            num_images=config.num_train_images,
            view="base_train",
            novel_to_background=config.novel_to_background,
            **kwargs,
        )
        val_source = _LazySynthetic(split="val", num_images=config.num_val_images or 200, view="full", **kwargs)
        len(train_source)  # renders and filters now, in the main process
    else:
        check_data_dir(config.dataset, config.data_dir)
        # Builders key their cache by config (the folder builder also by a fingerprint of its files); rebuild_data
        # regenerates it regardless, for edits a fingerprint cannot see.
        views = {
            view: build_view(
                config.dataset,
                view,
                fold=config.fold,
                data_dir=config.data_dir,
                cache_dir=config.cache_dir,
                split_kind=config.split_kind,
                min_pixels=config.min_pixels,
                novel_to_background=config.novel_to_background,
                rebuild=rebuild_data,
            )
            for view in ("base_train", "val")
        }
        train_source, val_source = views["base_train"], views["val"]
    if len(train_source) == 0:
        raise ValueError(
            f"the base-training view of {config.dataset!r} fold {config.fold} is empty: no image has a base class "
            f"with >= min_pixels pixels; lower min_pixels or check data_dir."
        )
    train = PretrainingDataset(
        train_source,
        processor,
        hflip=config.hflip,
        seed=config.seed,
        scale_range=config.scale_range,
        color_jitter=config.color_jitter,
    )
    val = PretrainingDataset(val_source, processor, label_map=val_map, limit=config.num_val_images)
    return train, val


# -- model -----------------------------------------------------------------------------------------------------
def build_model(config: TrainingConfig, split=None) -> GFSSModel:
    """
    A [`GFSSModel`] with the fold's base classes (`[background, base...]` rows), initialised from `config.seed`
    (the global RNG is forked, not touched), with pre-trained backbone weights when `model.backbone_pretrained` (or
    the older `backbone_weights`) is set, and a frozen backbone when `config.freeze_backbone`. The projection head
    exists only when `contrastive_weight > 0`.
    """
    split = split if split is not None else _fold_split(config)
    model_config = GFSSConfig(
        **model_config_kwargs(config),
        use_projection=config.contrastive_weight > 0,
        label_smoothing=config.label_smoothing,
        base_class_names=split.base_names,
        dataset=split.dataset,
        fold=split.fold,
        split_kind=split.split_kind,
    )
    # Module initialisers draw from the global RNG; fork it so that building a model neither depends on nor
    # changes the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = GFSSModel(model_config)
    if model_config.backbone_pretrained:
        load_backbone_weights(model)
    if config.freeze_backbone:
        model.freeze_backbone(include_decoder=False)
    return model


def model_config_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """
    The architecture keyword arguments of [`GFSSConfig`] for a run: the `model:` mapping, with the older top-level
    `backbone_weights` as `backbone_pretrained`, and the normalisation of a timm pretrained tag (its
    `pretrained_cfg` mean / std) unless the mapping sets `image_mean` / `image_std`.
    """
    kwargs = as_model_kwargs(config.model)
    if config.backbone_weights and not kwargs.get("backbone_pretrained"):
        kwargs["backbone_pretrained"] = config.backbone_weights
    normalization = backbone_normalization(kwargs.get("backbone_pretrained"))
    if normalization is not None:
        for name, value in zip(("image_mean", "image_std"), normalization):
            if kwargs.get(name) is None:
                kwargs[name] = value
    return kwargs


def cosine_schedule(total_steps: int, schedule: str = "cosine") -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: `0.5 * (1 + cos(pi * step / total_steps))` (or 1 for constant)."""
    if schedule == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


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


def preflight(
    config: TrainingConfig, resume_from_checkpoint=None, push_to_hub: bool = False, hub_model_id: str | None = None
):
    """
    Check everything that can be wrong with a run's inputs before any model is built or batch read: the config
    values, the fold, the data folder layout, the resume checkpoint and the Hub target.

    Returns:
        `tuple(FoldSplit, Path | None)`: the fold and the checkpoint to resume from.
    """
    config.validate()
    if push_to_hub and not hub_model_id:
        raise ValueError("push_to_hub=True needs hub_model_id (e.g. 'user/gfss-pspnet-pascal5i-fold0').")
    # Backbone weights: a bad tag, a missing file or an offline machine without a cached copy is named now, not
    # after the data are built. A tag is fetched here once; build_model finds it in the cache.
    source = model_config_kwargs(config).get("backbone_pretrained")
    if source:
        path = fetch_backbone_weights(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"backbone weights file {path!r} does not exist; give an existing file or a timm tag such as "
                "'resnet50s.gluon_in1k' (--set model.backbone_pretrained=...)."
            )
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
    `eval_results.json`, and `checkpoints/checkpoint-N/` when checkpointing (safetensors + JSON, see
    [`gfss_hf.checkpointing`]).

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
    # Only trainable parameters: a frozen backbone (`freeze_backbone`) must not even see weight decay.
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        )
    train_loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(train_set) >= config.batch_size * world,
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
        restored = load_checkpoint(checkpoint, accelerator, model, optimizer, scheduler)
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
        accelerator.init_trackers(
            "gfss_pretrain",
            config={k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))},
        )
    log_path = output_dir / "train_log.jsonl"
    if checkpoint is not None and accelerator.is_main_process and log_path.is_file():
        # A killed run may have logged steps past its last checkpoint; the resumed run logs them again.
        kept = [line for line, record in _read_log(log_path) if record["step"] <= global_step]
        atomic_write_text(log_path, "".join(line + "\n" for line in kept))
    elif checkpoint is None and accelerator.is_main_process and log_path.is_file():
        atomic_write_text(log_path, "")  # a new run does not append to a previous run's log
    progress = tqdm(
        total=total_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="pre-training"
    )
    device_type = accelerator.device.type
    fork_devices = [accelerator.device.index or 0] if device_type == "cuda" else []
    completed = True
    last_checkpoint = checkpoint
    start_epoch = global_step // steps_per_epoch
    model.train()

    def state_dict_for_checkpoint():
        return {
            "global_step": global_step,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "world_size": world,
            "history": history,
            "eval": evals,
            "scheduler": scheduler.state_dict(),
            "accelerator_step": accelerator.step,
            "config": config.to_dict(),
        }

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
                    outputs = model(
                        pixel_values=batch["pixel_values"], labels=batch["labels"], output_embeddings=use_contrastive
                    )
                ce = outputs.loss
                if use_contrastive:
                    contrastive = _contrastive_term(
                        unwrapped,
                        outputs,
                        batch["labels"],
                        config,
                        accelerator,
                        _step_seed(config.seed, global_step, micro, rank, 1),
                    )
                    loss = ce + contrastive_weight(config, global_step) * contrastive
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
                record = {
                    "step": global_step,
                    "epoch": epoch,
                    "loss": values[0],
                    "ce": values[1],
                    "contrastive": values[2],
                    "lr": scheduler.get_last_lr()[0],
                }
                history.append(record)
                running.zero_()
                running_count = 0
                progress.set_postfix(loss=f"{values[0]:.4f}")
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=global_step)
                if accelerator.is_main_process:
                    with open(log_path, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
            end_of_epoch = global_step % steps_per_epoch == 0
            if (
                end_of_epoch
                and config.eval_every_epochs
                and (epoch + 1) % config.eval_every_epochs == 0
                and global_step < total_steps
            ):
                result = {
                    "step": global_step,
                    "epoch": epoch + 1,
                    **evaluate_base_miou(model, val_loader, accelerator, num_classes),
                }
                evals.append(result)
                accelerator.log(
                    {f"val/{k}": v for k, v in result.items() if k not in ("step", "epoch")}, step=global_step
                )
                logger.info(f"epoch {epoch + 1}: {result}")
            stop = config.stop_after_steps is not None and global_step >= config.stop_after_steps
            if (config.checkpointing_steps and global_step % config.checkpointing_steps == 0) or (
                stop and global_step < total_steps
            ):
                last_checkpoint = save_checkpoint(
                    accelerator,
                    output_dir,
                    state_dict_for_checkpoint(),
                    config.checkpoints_total_limit,
                    model,
                    optimizer,
                    {"rng": rng_state(), "running": running, "running_count": running_count},
                )
            if global_step >= total_steps:
                break
            if stop:
                completed = False
                break
        if not completed:
            break
    progress.close()

    summary = {
        "global_step": global_step,
        "completed": completed,
        "history": history,
        "eval": evals,
        "output_dir": str(output_dir),
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        "world_size": world,
    }
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
                logger.warning(
                    f"dropped the partial last line {number} of {path} ({line[:80]!r}): a run was "
                    "stopped while writing it; the resumed run logs that step again"
                )
                break
            raise ValueError(
                f"line {number} of {str(path)!r} is not a log record ({err}): {line[:80]!r}; fix or delete the line "
                "(or the file) and resume again."
            ) from err
        out.append((line, record))
    return out


def contrastive_weight(config: TrainingConfig, step: int) -> float:
    """Lambda at optimizer step `step` (0-based): `contrastive_weight`, ramped linearly from 0 over the first
    `contrastive_warmup_steps` steps when that is > 0 (step `k` of the ramp uses `(k + 1) / N` of lambda)."""
    warmup = int(config.contrastive_warmup_steps)
    if warmup <= 0 or step >= warmup:
        return float(config.contrastive_weight)
    return float(config.contrastive_weight) * (step + 1) / warmup


def _contrastive_term(
    model: GFSSModel, outputs, labels: torch.Tensor, config: TrainingConfig, accelerator, seed: int
) -> torch.Tensor:
    """Sample on this process with the GLOBAL pair count, then contrast against the samples of every process."""
    embeddings = outputs.embeddings
    size = embeddings.shape[-2:]
    with torch.no_grad():
        # Predictions at the feature resolution (the decoder keeps the backbone's size, so this is also the size of
        # backbone-sourced embeddings) decide hard (mispredicted) vs easy views.
        predictions = model.classifier(outputs.features.to(model.classifier.weight.dtype)).argmax(1)
    num_pairs = count_contrastive_pairs(
        labels, size, max_views=config.max_views, ignore_index=model.config.ignore_index
    )
    if accelerator.num_processes > 1:
        num_pairs = int(accelerator.reduce(torch.tensor(num_pairs, device=labels.device), reduction="sum").item())
    generator = torch.Generator().manual_seed(seed)
    x, y = sample_contrastive_pixels(
        embeddings,
        labels,
        predictions,
        max_samples=config.max_samples,
        max_views=config.max_views,
        ignore_index=model.config.ignore_index,
        num_pairs=num_pairs,
        generator=generator,
    )
    return contrastive_loss_from_samples(
        x,
        y,
        temperature=config.temperature,
        base_temperature=config.base_temperature,
        background_index=0,
        background_anchors=config.background_anchors,
        gather=accelerator.num_processes > 1,
    )


def _save_final(model: GFSSModel, output_dir: Path, summary: dict, config: TrainingConfig) -> None:
    model.save_pretrained(str(output_dir))
    for weights in output_dir.glob("*.safetensors"):
        apply_umask(weights)  # safetensors (0.8) creates its files 0600, unlike a plain write
    GFSSImageProcessor.from_config(model.config).save_pretrained(str(output_dir))
    results = {
        "global_step": summary["global_step"],
        "final_eval": summary["final_eval"],
        "eval": summary["eval"],
        "dataset": config.dataset,
        "fold": config.fold,
        "world_size": summary["world_size"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    atomic_write_text(output_dir / "eval_results.json", json.dumps(results, indent=2))
