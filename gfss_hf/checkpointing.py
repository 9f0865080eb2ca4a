"""Resumable pre-training checkpoints: finding, writing, reading and checking them against the run.

A checkpoint (`<output_dir>/checkpoints/checkpoint-N/`) holds only safetensors and JSON, so reading one cannot run
code: `model.safetensors`, `optimizer.safetensors` (optimizer and gradient scaler), `process_state_<rank>.safetensors`
(RNG states, running loss sums) and `trainer_state.json` (step, schedule, history and the run's resolved config). A
resume is refused when the checkpoint's config differs from the run's in any key but
[`gfss_hf.training_config.INFRASTRUCTURE_KEYS`], and so is a new run into an output folder that holds another run's
checkpoints.

```python
>>> from gfss_hf.checkpointing import find_last_checkpoint, read_trainer_state
>>> checkpoint = find_last_checkpoint("outputs/pretrain")
>>> read_trainer_state(checkpoint)["global_step"] if checkpoint else None
```
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .training_config import INFRASTRUCTURE_KEYS, TrainingConfig, model_defaults

__all__ = [
    "check_checkpoint_config",
    "find_last_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "resolve_checkpoint",
    "rng_state",
    "save_checkpoint",
]

_CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_PREFIX = "checkpoint-"
_TRAINER_STATE = "trainer_state.json"

# Every file of a checkpoint is safetensors or JSON: neither format can run code when read, so a checkpoint folder
# received from elsewhere (or tampered with) is at worst refused, never executed. Accelerate's save_state would
# write the optimizer, RNG and registered objects with torch.save (pickle), so the loop saves its own state.
_CHECKPOINT_FORMAT = 2
_MODEL_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_PROCESS_FILE = "process_state_{rank}.safetensors"
_STRUCTURE_KEY = "gfss_structure"


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
    model = {**model_defaults(), **values.pop("model", {})}
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
    what = (
        f"checkpoint {str(checkpoint)!r}"
        if resuming
        else (f"output_dir {str(output_dir)!r} already holds checkpoints ({checkpoint.name}) of another run, which")
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
        return {
            "__dict__": [[_encode(k, tensors, where), _encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]
        }
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


def save_checkpoint(
    accelerator, output_dir: Path, state: dict, total_limit: int | None, model, optimizer, process_state: dict
) -> Path:
    """
    Write a checkpoint into a temporary folder, then rename it: a killed process never leaves a half checkpoint
    that `latest` would pick. Files: `model.safetensors` (weights), `optimizer.safetensors` (optimizer and
    gradient-scaler state), `process_state_<rank>.safetensors` (each process's RNG states and running loss sums)
    and `trainer_state.json` (step, schedule, history, the run's config).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator; every process calls this function.
        output_dir (`Path`): the run's output folder; the checkpoint goes to `checkpoints/checkpoint-<global_step>`.
        state (`dict`): JSON-able trainer state with an integer `global_step` (the format version is added here).
        total_limit (`int`, *optional*): keep only the newest `total_limit` checkpoints.
        model (`torch.nn.Module`), optimizer (`torch.optim.Optimizer`): prepared by `accelerator`.
        process_state (`dict`): this process's state (e.g. [`rng_state`]), tensors and plain values.

    Returns:
        `Path`: the checkpoint folder.
    """
    state = {**state, "format": _CHECKPOINT_FORMAT}
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
            weights = {
                k: v.detach().to("cpu").contiguous().clone()
                for k, v in accelerator.unwrap_model(model).state_dict().items()
            }
            _write_file(target, save(weights, metadata={"format": "pt"}))
            target = tmp / _OPTIMIZER_FILE
            scaler = getattr(accelerator, "scaler", None)
            _write_state_file(
                target,
                {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None},
            )
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


def load_checkpoint(checkpoint: Path, accelerator, model, optimizer, scheduler) -> dict:
    """
    Restore weights, optimizer, scheduler, gradient scaler and this process's RNG states from `checkpoint`
    (safetensors and JSON only); an unreadable or missing file raises a `ValueError` or `FileNotFoundError` naming it.

    Args:
        checkpoint (`Path`): a `checkpoints/checkpoint-N` folder written by [`save_checkpoint`].
        accelerator (`accelerate.Accelerator`), model, optimizer: as prepared by the run; restored in place.
        scheduler (`torch.optim.lr_scheduler.LRScheduler`): restored from `trainer_state.json`.

    Returns:
        `dict` with `trainer_state` (the JSON state) and `process` (this process's saved state).
    """
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


def rng_state() -> dict[str, Any]:
    """The global RNG states of Python, numpy, torch and CUDA, as [`load_checkpoint`] restores them."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
