"""Throughput of the episodic evaluation against a reference-style loop, on the same machine, model and episodes.

Reference-style loop (what the public reference code does per episode): features of the support(s), the query and
the extra base image recomputed by a forward pass for EVERY episode, one episode at a time, the FSS head and then
the GFSS head fine-tuned in turn. `gfss_hf.evaluation.evaluate_episodes`: every image's features computed once
(cache), episodes adapted in batches.

Both run the `paper` protocol with the same `gfss_hf.adaptation` functions and the same per-episode seeds, so their
metric sums (confusion matrices and per-episode IoU sums) must be identical within each loss resolution; the script
checks it and reports episodes/s.

    OMP_NUM_THREADS=1 python bench/evaluation.py --num_images 2 --num_episodes 28      # reduced (~14:1)
    OMP_NUM_THREADS=1 python bench/evaluation.py --num_images 10 --num_episodes 140 --reference_episodes 28

The reference-style loop costs the same for every episode (nothing is cached), so `--reference_episodes N` times it
on the first N episodes only (its episodes/s then stands for the whole run) and checks identity against this
evaluation on those same N episodes; this evaluation is timed on all of them, where its cache pays off.

Defaults: ResNet-50 (deep stem, output stride 8) + PSP head at 473 px with random weights (timing only) and BatchNorm
statistics measured on the pool's images (`bench/_calibration.py`; `--raw_batchnorm` keeps the default ones, whose
saturated logits no trained model has), 1-shot, 100 steps, both loss resolutions. Writes a JSON report with
`--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from _calibration import recalibrate_batchnorm  # bench/, on the path when run as a script

from gfss_hf import GFSSConfig, GFSSImageProcessor, GFSSModel
from gfss_hf._io import atomic_write_text
from gfss_hf.adaptation import AdaptationConfig, adapt_classifier, predict
from gfss_hf.data.episodes import class_index_from_pixel_counts, sample_paper_episodes, scaled_pixel_threshold
from gfss_hf.data.splits import IGNORE_INDEX, get_split
from gfss_hf.data.synthetic import SyntheticSegmentation
from gfss_hf.evaluation import EvaluationOptions, episode_seed, evaluate_episodes
from gfss_hf.metrics import PooledIoU


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2, help="distinct val images the episodes draw from")
    parser.add_argument("--num_episodes", type=int, default=28)
    parser.add_argument("--image_size", type=int, default=473)
    parser.add_argument("--backbone", default="resnet50s")
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--episode_batch_size", type=int, default=None, help="default: the evaluation's default")
    parser.add_argument("--loss_resolutions", nargs="+", default=["feature", "input"], choices=["feature", "input"])
    parser.add_argument("--scan_images", type=int, default=120, help="val images scanned to pick the pool")
    parser.add_argument(
        "--reference_episodes",
        type=int,
        default=None,
        help="time the reference-style loop (and check identity) on the first N episodes only",
    )
    parser.add_argument("--raw_batchnorm", action="store_true", help="keep the default BatchNorm statistics")
    parser.add_argument("--output", help="JSON report path")
    return parser.parse_args()


def min_pixels(size):
    """The protocol's 2,048 px at 473 px, scaled to `size` (for quick runs of this script on small images)."""
    return scaled_pixel_threshold(2048, 473, size)


def image_pool(split, size, num_images, scan):
    """`num_images` val images that share a novel class (>= 2,048 px), so that episodes can be drawn from them."""
    data = SyntheticSegmentation("val", num_images=scan, image_size=size)
    counts = data.pixel_counts()
    index = class_index_from_pixel_counts(counts, min_pixels(size), class_ids=split.novel_ids)
    best = max(split.novel_ids, key=lambda c: len(index[c]))
    if len(index[best]) < num_images:
        raise ValueError(f"only {len(index[best])} of {scan} scanned images share a novel class; raise --scan_images.")
    return data, sorted(index[best][:num_images])


class PoolSource:
    """The chosen images of a `SyntheticSegmentation`, as an image source."""

    def __init__(self, data, ids):
        self.data, self.ids = data, list(ids)
        all_counts = data.pixel_counts()
        self._counts = {i: all_counts[i] for i in self.ids}

    def get_by_id(self, image_id):
        return self.data.get_by_id(image_id)

    def pixel_counts(self):
        return self._counts


def reference_loop(model, processor, split, source, episodes, adaptation):
    """Per episode: forward passes of every image of the episode, FSS then GFSS fine-tuning, one episode at a time."""
    size = (processor.image_size, processor.image_size)
    base = len(split.base_ids)
    rows = {cid: r + 1 for r, cid in enumerate(split.base_ids)}
    rows.update({cid: base + 1 + r for r, cid in enumerate(split.novel_ids)})
    num_rows = base + 1 + len(split.novel_ids)
    accs = {name: PooledIoU(num_rows) for name in ("fss", "gfss_novel", "gfss_base")}
    align = model.config.logits_align_corners
    fss_cfg = adaptation.replace(method="fss")
    gfss_cfg = adaptation.replace(method="gfss")

    def encode(image_id):
        sample = source.get_by_id(image_id)
        batch = processor(sample["image"], segmentation_maps=sample["label"], return_tensors="pt")
        return model.extract_features(batch["pixel_values"])[0], batch["labels"][0]

    def binary(label, class_id, value=1):
        out = torch.where(label == class_id, value, 0)
        return torch.where(label == IGNORE_INDEX, IGNORE_INDEX, out)

    with torch.no_grad():
        for spec in episodes:
            c = spec.class_ids[0]
            support = [encode(i) for i in spec.support_ids[c]]
            s_feat = torch.stack([f for f, _ in support])
            s_mask = torch.stack([binary(lab, c) for _, lab in support])
            q_feat, q_label = encode(spec.query_id)
            seed = episode_seed(adaptation.seed, spec)
            target = binary(q_label, c, rows[c])[None]

            fss = adapt_classifier(model, s_feat, s_mask, fss_cfg, seeds=seed)
            pred = predict(q_feat[None], fss, size=size, align_corners=align).argmax(1)
            accs["fss"].update(torch.where(pred == 1, rows[c], 0), target)

            classes = torch.zeros(len(support), dtype=torch.long)
            gfss = adapt_classifier(
                model,
                s_feat,
                s_mask,
                gfss_cfg,
                num_teacher_rows=base + 1,
                num_novel_classes=1,
                support_classes=classes,
                seeds=seed,
            )
            pred = predict(q_feat[None], gfss, size=size, align_corners=align).argmax(1)
            accs["gfss_novel"].update(torch.where(pred == base + 1, rows[c], 0), target)
            if spec.base_query_id is not None:
                b_feat, b_label = encode(spec.base_query_id)
                b = spec.base_class_id
                pred = predict(b_feat[None], gfss, size=size, align_corners=align).argmax(1)
                # Binary IoU of b on its image: other base classes predicted there are "not b".
                accs["gfss_base"].update(torch.where(pred == rows[b], rows[b], 0), binary(b_label, b, rows[b])[None])
    return accs


def main():
    args = parse_args()
    split = get_split("synthetic", 0)
    config = GFSSConfig(
        backbone=args.backbone,
        hidden_size=args.hidden_size,
        image_size=args.image_size,
        use_projection=False,
        base_class_names=split.base_names,
        dataset="synthetic",
        fold=0,
    )
    torch.manual_seed(0)
    model = GFSSModel(config).eval()
    processor = GFSSImageProcessor.from_config(config)
    data, ids = image_pool(split, args.image_size, args.num_images, args.scan_images)
    source = PoolSource(data, ids)
    index = class_index_from_pixel_counts(source.pixel_counts(), min_pixels(args.image_size))
    episodes = sample_paper_episodes(
        index, ids, split.novel_ids, split.base_ids, args.shots, args.num_episodes, 42, dataset="synthetic", fold=0
    )
    distinct = {i for e in episodes for i in [e.query_id, *e.all_support_ids(), e.base_query_id] if i}
    print(f"{len(episodes)} episodes over {len(distinct)} distinct images, torch threads {torch.get_num_threads()}")
    if not args.raw_batchnorm:
        calibration = [processor(source.get_by_id(i)["image"], return_tensors="pt")["pixel_values"] for i in ids]
        recalibrate_batchnorm(model, torch.cat(calibration))

    with torch.no_grad():  # one forward pass, for the projection
        pixels = processor(source.get_by_id(ids[0])["image"], return_tensors="pt")["pixel_values"]
        model.extract_features(pixels)
        start = time.perf_counter()
        model.extract_features(pixels)
        feature_seconds = time.perf_counter() - start

    report = {
        "command": "python bench/evaluation.py "
        + " ".join(
            f"--{k}" if v is True else f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None and v is not False
        ),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "num_episodes": len(episodes),
        "distinct_images": len(distinct),
        "feature_seconds_per_image": feature_seconds,
        "modes": {},
    }
    for mode in args.loss_resolutions:
        adaptation = AdaptationConfig(steps=args.steps, loss_resolution=mode)
        options = EvaluationOptions(adaptation=adaptation, episode_batch_size=args.episode_batch_size, progress=False)
        start = time.perf_counter()
        ours = evaluate_episodes(model, episodes, split=split, val_source=source, processor=processor, options=options)
        ours_seconds = time.perf_counter() - start
        ref_episodes = episodes[: args.reference_episodes] if args.reference_episodes else episodes
        start = time.perf_counter()
        ref = reference_loop(model, processor, split, source, ref_episodes, adaptation)
        ref_seconds = time.perf_counter() - start
        check = ours
        if len(ref_episodes) < len(episodes):
            check = evaluate_episodes(
                model, ref_episodes, split=split, val_source=source, processor=processor, options=options
            )
        identical = all(check.accumulators[k].state_dict() == ref[k].state_dict() for k in ref)
        ours_rate, ref_rate = len(episodes) / ours_seconds, len(ref_episodes) / ref_seconds
        entry = {
            "ours_seconds": ours_seconds,
            "reference_seconds": ref_seconds,
            "reference_episodes": len(ref_episodes),
            "ours_episodes_per_second": ours_rate,
            "reference_episodes_per_second": ref_rate,
            "speedup": ours_rate / ref_rate,
            "identical_predictions": identical,
            "episode_batch_size": ours.timing["episode_batch_size"],
            "ours_adaptation_seconds_per_episode": (ours_seconds - len(distinct) * feature_seconds) / len(episodes),
            "metrics": ours.metrics,
        }
        report["modes"][mode] = entry
        print(
            f"[{mode}] ours {entry['ours_episodes_per_second']:.3f} ep/s, reference "
            f"{entry['reference_episodes_per_second']:.3f} ep/s, speedup {entry['speedup']:.1f}x, identical "
            f"sums: {identical}",
            flush=True,
        )
    if "input" in report["modes"]:
        reference_input = report["modes"]["input"]["reference_episodes_per_second"]
        for entry in report["modes"].values():
            entry["speedup_vs_reference_input"] = entry["ours_episodes_per_second"] / reference_input
    # Projection to a full 20,000-episode fold with PASCAL's 1,449 val images (each image's features once).
    for entry in report["modes"].values():
        entry["projected_fold_hours"] = (
            1449 * feature_seconds + 20000 * entry["ours_adaptation_seconds_per_episode"]
        ) / 3600
        entry["projected_reference_fold_hours"] = 20000 / entry["reference_episodes_per_second"] / 3600
    print(json.dumps(report, indent=2, default=float))
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
