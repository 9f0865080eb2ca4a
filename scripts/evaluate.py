"""Episodic evaluation of a pre-trained GFSS model under the `paper`, `diam` or `capl` protocol.

Single process:

    python scripts/evaluate.py MODEL_DIR --protocol paper --shots 1 --num_episodes 1000 --output_dir out/

Several processes (on CPU as well: two real gloo processes):

    accelerate launch --multi_gpu --num_processes 2 scripts/evaluate.py MODEL_DIR --protocol diam --runs 5

Writes `results.json` (every number, the configuration, the package version, the episode list hash) and
`results.md`. `--save_episodes FILE` stores the sampled episodes; `--episodes FILE` replays exactly those.
Method hyper-parameters can also come from a YAML file (`--config`, keys = option names); flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import yaml
from accelerate import Accelerator
from transformers import HfArgumentParser

from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf._io import ensure_writable_dir
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.arguments import dataclass_flags
from gfss_hf.data.episodes import PROTOCOLS, build_episodes, load_episodes, save_episodes
from gfss_hf.data.sources import DATASET_NAMES, get_data_source, load_fold_split, load_image_source
from gfss_hf.evaluation import (
    EvaluationOptions,
    check_episodes,
    check_model_matches_split,
    estimate_evaluation_seconds,
    evaluate_episodes,
)
from gfss_hf.results import results_markdown, save_results

# A projected run longer than this gets advice on how to shorten it.
_LONG_RUN_SECONDS = 600

# The method's flags are AdaptationConfig's fields (names, types, defaults, help from its docstring), so a field
# added to it is a flag here without an edit. Left out: `method` (the protocol decides which heads run), `seed`
# (`--seed` is the episodes' seed), and what the model decides (`align_corners`, `ignore_index`).
METHOD_FLAGS = dataclass_flags(
    AdaptationConfig, exclude=("method", "seed", "align_corners", "ignore_index"), group="method (few-shot adaptation)"
)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = HfArgumentParser([METHOD_FLAGS], description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("model", help="a save_pretrained folder or a Hub id (model + image processor)")
    parser.add_argument("--config", help="YAML file of option defaults (keys: the option names below)")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default="synthetic",
        choices=list(DATASET_NAMES),
        help="folder: your own images/ + masks/ + classes.json (as scripts/pretrain.py trains on)",
    )
    data.add_argument("--data_dir", help="dataset folder (PASCAL / COCO 2014 or 2017 / CamVid / folder)")
    data.add_argument("--cache_dir", help="datasets cache of the builders")
    data.add_argument("--fold", type=int, default=None, help="default: the model config's fold, else 0")
    data.add_argument("--split_kind", default=None, help="COCO-20i fold table: interleaved or consecutive")
    data.add_argument("--num_val_images", type=int, default=200, help="synthetic val list size")
    data.add_argument("--num_train_images", type=int, default=1000, help="synthetic train list size (capl)")
    data.add_argument("--synthetic_image_size", type=int, default=96)
    data.add_argument("--synthetic_seed", type=int, default=0)
    proto = parser.add_argument_group("protocol")
    proto.add_argument("--protocol", default="paper", choices=list(PROTOCOLS))
    proto.add_argument("--shots", type=int, default=1)
    proto.add_argument("--num_episodes", type=int, default=20000, help="paper protocol")
    proto.add_argument("--runs", type=int, default=5, help="diam / capl: support sets")
    proto.add_argument("--seed", type=int, default=42)
    proto.add_argument(
        "--min_pixels",
        type=int,
        default=None,
        help="area threshold in pixels (default: the published one for PASCAL / COCO, else the same "
        "share of the median image area: 0.92 %% paper/capl, 9.4 %% diam)",
    )
    proto.add_argument(
        "--support_split",
        default="val",
        choices=["val", "train"],
        help="paper protocol: the list the supports come from. train: supports from the train list, queries from "
        "val (for a val list shot in one sequence, e.g. CamVid's single drive, where val supports share the query's "
        "viewpoint); val: the published protocol",
    )
    proto.add_argument("--episodes", help="replay the episodes of this file (from --save_episodes)")
    proto.add_argument("--save_episodes", help="write the episodes to this file")
    infra = parser.add_argument_group("infrastructure")
    infra.add_argument("--output_dir", default="evaluation_results")
    infra.add_argument(
        "--episode_batch_size",
        type=int,
        default=None,
        help="default: 8, or 1 on CPU with --loss_resolution input (faster there)",
    )
    infra.add_argument("--feature_batch_size", type=int, default=1)
    infra.add_argument("--no_cache", action="store_true", help="recompute features for every episode")
    infra.add_argument("--feature_dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    infra.add_argument("--cache_max_gb", type=float, default=None)
    infra.add_argument("--no_progress", action="store_true")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.config:
        with open(args.config, encoding="utf-8") as handle:
            defaults = yaml.safe_load(handle) or {}
        unknown = sorted(set(defaults) - set(vars(args)))
        if unknown:
            parser.error(f"{args.config}: unknown option(s) {unknown}")
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    return args


def check_output_dir(path: str) -> None:
    """Refuse, before any work, an output folder the results could not be written to."""
    try:
        ensure_writable_dir(path, "--output_dir")
    except OSError as err:
        raise SystemExit(str(err)) from err


def evaluation_function(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    if accelerator.is_main_process:
        check_output_dir(args.output_dir)
    if get_data_source(args.dataset).needs_data_dir and not args.data_dir:
        raise SystemExit(f"--dataset {args.dataset} is read from disk: pass --data_dir (the dataset folder).")
    model = GFSSModel.from_pretrained(args.model)
    try:
        processor = GFSSImageProcessor.from_pretrained(args.model)
    except OSError:
        processor = GFSSImageProcessor.from_config(model.config)
    fold = args.fold if args.fold is not None else (model.config.fold or 0)
    split = load_fold_split(args.dataset, fold, args.split_kind, args.data_dir)
    check_model_matches_split(model, split)
    common = dict(
        fold=fold,
        split_kind=args.split_kind,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        image_size=args.synthetic_image_size,
        seed=args.synthetic_seed,
    )
    val = load_image_source(args.dataset, "val", num_images=args.num_val_images, **common)
    if args.support_split == "train" and args.protocol != "paper":
        raise SystemExit(f"--support_split train is an option of the paper protocol, not of {args.protocol}.")
    train = None
    if args.protocol == "capl" or args.support_split == "train":
        train = load_image_source(args.dataset, "train", num_images=args.num_train_images, **common)

    description = getattr(val, "description", "")
    if description:
        accelerator.print(f"val images: {description}")
    if args.episodes:
        episodes = load_episodes(args.episodes)
        if {e.protocol for e in episodes} != {args.protocol}:
            raise ValueError(
                f"{args.episodes} holds {sorted({e.protocol for e in episodes})} episodes, not "
                f"{args.protocol!r}; pass the matching --protocol."
            )
        check_episodes(episodes, split, {"val": val, **({"train": train} if train is not None else {})})
    else:
        episodes = build_episodes(
            args.protocol,
            split,
            val,
            shots=args.shots,
            num_episodes=args.num_episodes,
            seed=args.seed,
            runs=args.runs,
            train_source=train,
            min_pixels=args.min_pixels,
            support_split=args.support_split,
        )
    if args.save_episodes and accelerator.is_main_process:
        save_episodes(args.save_episodes, episodes)

    method = {f.name: getattr(args, f.name) for f in dataclasses.fields(METHOD_FLAGS)}
    if method.get("ce_weighting") == "none":  # the spelling of the former flag's choice for None
        method["ce_weighting"] = None
    options = EvaluationOptions(
        adaptation=AdaptationConfig(**method),
        episode_batch_size=args.episode_batch_size,
        feature_batch_size=args.feature_batch_size,
        cache_features=not args.no_cache,
        feature_dtype=args.feature_dtype,
        cache_max_bytes=None if args.cache_max_gb is None else int(args.cache_max_gb * 2**30),
        progress=not args.no_progress,
    )
    if accelerator.is_main_process:
        seconds = estimate_evaluation_seconds(model, processor, episodes, options) / accelerator.num_processes
        accelerator.print(f"{len(episodes)} episodes; projected time on this machine: {_duration(seconds)}")
        if seconds > _LONG_RUN_SECONDS:
            advice = []
            if options.adaptation.loss_resolution == "input":
                advice.append("--loss_resolution feature (loss at feature resolution, several times faster)")
            if args.protocol == "paper" and not args.episodes:
                advice.append(f"fewer episodes (--num_episodes; {args.num_episodes} now)")
            advice.append("a GPU, or several processes (accelerate launch)")
            accelerator.print("This is long; to shorten it: " + "; ".join(advice) + ".")
    result = evaluate_episodes(
        model,
        episodes,
        split=split,
        val_source=val,
        train_source=train,
        processor=processor,
        options=options,
        accelerator=accelerator,
    )
    config = {
        "model": args.model,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "cache_dir": args.cache_dir,
        "fold": fold,
        "images": description,
        "split_kind": split.split_kind,
        "protocol": args.protocol,
        "shots": episodes[0].shots,
        "support_split": episodes[0].support_list,
        "seed": args.seed,
        "episodes_file": args.episodes,
        "options": options.to_dict(),
        "model_config": {"backbone": model.config.backbone, "image_size": model.config.image_size},
    }
    if args.dataset == "synthetic":
        config["synthetic"] = {
            "num_val_images": args.num_val_images,
            "num_train_images": args.num_train_images,
            "image_size": args.synthetic_image_size,
            "seed": args.synthetic_seed,
        }
    payload = {}
    if accelerator.is_main_process:
        payload = save_results(args.output_dir, result, config)
        accelerator.print(results_markdown(result))
    accelerator.wait_for_everyone()
    return payload


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv=None) -> dict:
    args = parse_args(argv)
    # On CPU, `accelerate launch --multi_gpu` + cpu=True forms a real gloo group (plain --cpu runs one process).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        return evaluation_function(args, accelerator)
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    main()
