"""Recompute a `paper`-protocol evaluation independently: replay its saved episodes through the public pipeline.

`scripts/evaluate.py` adapts and scores episodes with its own batched machinery (feature cache, episode batches,
accumulators). This script checks what it reports by the shortest independent route a user could take:

1. read the episodes `scripts/evaluate.py --save_episodes FILE` wrote, and the run's `results.json` (dataset and
   fine-tuning options);
2. per episode, call `pipeline("few-shot-segmentation")` with the episode's K supports (binary masks of the novel
   class) on [query, extra base image] in `gfss` mode, and on the query in `fss` mode, with the episode's seed;
3. score as METHOD.md section 5 says, written here from that text: per episode, the BINARY IoU of the episode's
   class (novel class on the query; base class on the base image, foreground iff it wins over all B + 2 classes),
   intersection and union summed over the episodes of that class only, mean over classes.

The pipeline returns label maps at the original image size while the protocol scores on the processor's canvas, so
the two agree exactly when the images are canvas-sized (the procedural dataset at the model's `image_size`) and
within resampling noise otherwise.

    python scripts/evaluate.py MODEL --num_episodes 120 --save_episodes ep.json --output_dir out
    python bench/replay_paper_protocol.py MODEL --episodes ep.json --results out/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict

import numpy as np
from tqdm.auto import tqdm
from transformers import pipeline

import gfss_hf  # noqa: F401  (registers the few-shot-segmentation task)
from gfss_hf._io import atomic_write_text
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.data.episodes import load_episodes
from gfss_hf.data.sources import load_image_source
from gfss_hf.data.splits import IGNORE_INDEX, get_split
from gfss_hf.evaluation import episode_seed

# results.json keys -> where the replay reads them
_COMPARED = ("fss_novel_miou", "gfss_novel_miou", "gfss_base_miou")


def _binary_counts(foreground: np.ndarray, label: np.ndarray, class_id: int) -> tuple[int, int]:
    valid = label != IGNORE_INDEX
    truth = label == class_id
    return int((foreground & truth & valid).sum()), int(((foreground | truth) & valid).sum())


def _mean_iou(sums: dict[int, list[int]]) -> float:
    values = [i / u for i, u in sums.values() if u > 0]
    return float(sum(values) / len(values)) if values else float("nan")


def replay(model: str, episodes_file: str, results_file: str, limit: int | None = None, progress: bool = True) -> dict:
    """
    Replay the episodes of a `paper` evaluation through the pipeline and compare with its `results.json`.

    Returns:
        `dict`: `replayed` (the three mIoUs recomputed), `reported` (the same keys from `results.json`),
        `max_abs_difference`, `num_episodes`.
    """
    with open(results_file, encoding="utf-8") as handle:
        results = json.load(handle)
    config = results["config"]
    episodes = load_episodes(episodes_file)[:limit]
    if {e.protocol for e in episodes} != {"paper"}:
        raise ValueError(
            f"{episodes_file} holds {sorted({e.protocol for e in episodes})} episodes; this replays 'paper'."
        )
    split = get_split(config["dataset"], config["fold"], config.get("split_kind"))
    synthetic = config.get("synthetic", {})
    source = load_image_source(
        config["dataset"],
        "val",
        fold=config["fold"],
        split_kind=config.get("split_kind"),
        data_dir=config.get("data_dir"),
        cache_dir=config.get("cache_dir"),
        num_images=synthetic.get("num_val_images"),
        image_size=synthetic.get("image_size"),
        seed=synthetic.get("seed", 0),
    )
    adaptation = dict(config["options"]["adaptation"])
    adaptation_seed = adaptation.pop("seed", 0)
    for key in ("method", "align_corners", "ignore_index"):
        adaptation.pop(key, None)
    adaptation = {k: v for k, v in adaptation.items() if k in AdaptationConfig.__dataclass_fields__}
    pipe = pipeline("few-shot-segmentation", model=model, device="cpu")
    names = dict(zip(split.novel_ids, split.novel_names))
    names.update(zip(split.base_ids, split.base_names))

    sums = {key: defaultdict(lambda: [0, 0]) for key in _COMPARED}
    for spec in tqdm(episodes, desc="replay", disable=not progress):
        c = spec.class_ids[0]
        supports = [source.get_by_id(i) for i in spec.support_ids[c]]
        masks = [
            np.where(s["label"] == IGNORE_INDEX, IGNORE_INDEX, s["label"] == c).astype(np.uint8) for s in supports
        ]
        query = source.get_by_id(spec.query_id)
        images = [query["image"]]
        if spec.base_query_id is not None:
            base = source.get_by_id(spec.base_query_id)
            images.append(base["image"])
        common = dict(
            support_images=[s["image"] for s in supports],
            support_masks=masks,
            class_names=[names[c]] * len(supports),
            seed=episode_seed(adaptation_seed, spec),
            return_label_map=True,
            **adaptation,
        )
        gfss = pipe(images, mode="gfss", **common)
        fss = pipe([query["image"]], mode="fss", **common)
        for key, out, class_id, label in (
            ("fss_novel_miou", fss[0], c, query["label"]),
            ("gfss_novel_miou", gfss[0], c, query["label"]),
            *([("gfss_base_miou", gfss[1], spec.base_class_id, base["label"])] if len(images) > 1 else []),
        ):
            index = {name: k for k, name in out["id2label"].items()}[names[class_id]]
            inter, union = _binary_counts(out["label_map"] == index, np.asarray(label), class_id)
            sums[key][class_id][0] += inter
            sums[key][class_id][1] += union
    replayed = {key: _mean_iou(sums[key]) for key in _COMPARED}
    reported = {key: results["metrics"][key] for key in _COMPARED}
    diffs = [
        abs(replayed[k] - reported[k]) for k in _COMPARED if reported[k] is not None and not math.isnan(replayed[k])
    ]
    return {
        "replayed": replayed,
        "reported": reported,
        "max_abs_difference": max(diffs) if diffs else float("nan"),
        "num_episodes": len(episodes),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the model folder scripts/evaluate.py evaluated")
    parser.add_argument("--episodes", required=True, help="the file of scripts/evaluate.py --save_episodes")
    parser.add_argument("--results", required=True, help="its results.json")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N episodes")
    parser.add_argument("--output", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    report = replay(args.model, args.episodes, args.results, args.limit)
    if args.limit is not None:
        print(f"note: only {args.limit} episodes replayed; results.json pools all of its episodes.")
    print(f"{'metric':<18} {'evaluate.py':>12} {'replayed':>10}")
    for key in _COMPARED:
        reported = report["reported"][key]
        print(f"{key:<18} {100 * reported:>11.2f}% {100 * report['replayed'][key]:>9.2f}%")
    print(
        f"largest difference: {100 * report['max_abs_difference']:.3f} points over {report['num_episodes']} episodes"
    )
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
