"""Pre-train a GFSS model (PSPNet) on the base classes of one fold, with Accelerate.

Hyper-parameters come from a YAML file (`scripts/configs/*.yaml`); flags are for the infrastructure. Any YAML value
can be overridden with `--set key=value`.

    # the embedded synthetic dataset, one process (CPU or one GPU)
    python scripts/pretrain.py --output_dir outputs/synthetic-fold0

    # PASCAL-5i fold 0 on 4 GPUs
    accelerate launch --multi_gpu --num_processes 4 scripts/pretrain.py --config scripts/configs/pascal5i.yaml \
        --data_dir /data/VOCdevkit/VOC2012 --fold 0 --output_dir outputs/pascal5i-fold0 --checkpointing_steps 1000

    # two real processes on CPU (gloo)
    accelerate launch --multi_gpu --num_processes 2 scripts/pretrain.py --set max_steps=20
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from transformers import HfArgumentParser

from gfss_hf.arguments import dataclass_flags
from gfss_hf.training import preflight, pretrain
from gfss_hf.training_config import TrainingConfig, parse_overrides

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"
# Infrastructure settings of TrainingConfig that have a flag of their own (each overrides the YAML when given);
# types, choices and help come from TrainingConfig. Every other key: --set KEY=VALUE.
CONFIG_FLAGS = dataclass_flags(
    TrainingConfig,
    include=(
        "fold",
        "data_dir",
        "output_dir",
        "mixed_precision",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "backbone_weights",
    ),
    optional=True,
    group="settings that override the YAML file",
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = HfArgumentParser([CONFIG_FLAGS], description="Base-class pre-training of a GFSS model with Accelerate.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML file of hyper-parameters.")
    parser.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' (in --output_dir) or the path of a checkpoint."
    )
    parser.add_argument(
        "--rebuild_data",
        action="store_true",
        help="Rebuild the prepared dataset cache (it is keyed by the files' names, sizes and mtimes; use this after "
        "an edit that kept them).",
    )
    parser.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Publish the final model to the Hub (a staged, checked export, as push_to_hub.py).",
    )
    parser.add_argument("--hub_model_id", default=None, help="Repo id for --push_to_hub, e.g. user/gfss-pascal5i-f0.")
    parser.add_argument("--hub_token", default=None, help="Token for --push_to_hub (default: the logged-in one).")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a YAML value (repeatable), e.g. --set num_epochs=5 --set model.backbone=resnet18.",
    )
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainingConfig:
    overrides = parse_overrides(args.overrides)
    for name in (f.name for f in dataclasses.fields(CONFIG_FLAGS)):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    return TrainingConfig.from_yaml(args.config, overrides=overrides)


def training_function(config: TrainingConfig, args: argparse.Namespace) -> dict:
    summary = pretrain(
        config,
        resume_from_checkpoint=args.resume_from_checkpoint,
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
        hub_token=args.hub_token,
        rebuild_data=args.rebuild_data,
    )
    final = summary.get("final_eval")
    if final is not None and int(os.environ.get("RANK", "0")) == 0:
        print(
            f"done: {summary['global_step']} steps, base mIoU {final['base_miou']:.4f}, saved to {config.output_dir}"
        )
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
        # Bad inputs end the run here with one readable line, before a model is built.
        preflight(config, args.resume_from_checkpoint, args.push_to_hub, args.hub_model_id)
    except (ValueError, OSError) as err:  # OSError: FileNotFoundError, backbone weights not reachable offline
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        training_function(config, args)
    except FloatingPointError as err:  # a diverged run: one readable line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
