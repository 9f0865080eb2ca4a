"""Why a CamVid model's few-shot novel numbers are what they are: small measurements behind the diagnosis in
docs/README_camvid.md.

For a pre-trained CamVid model, on a few episodes of one protocol, every fine-tuning variant named on the command
line is scored per novel class with what the IoU alone hides: precision, recall and the ratio of predicted to true
novel pixels (under 1: the class is under-predicted), pooled over the episodes like the protocol's IoU (`paper`: the
binary IoU of the episode's class on its query; `diam`: every val query of the run over all B + 1 + N rows). With
`--stats`, also the scale of the features and rows and the frozen teacher's background probability.

    python bench/camvid_diagnosis.py MODEL --data_dir /data/CamVid --protocol paper --shots 1 5 --episodes 60 \
        --support_split train --variants fss gamma0 gamma10 gamma10_skip
    python bench/camvid_diagnosis.py MODEL --data_dir /data/CamVid --protocol diam --runs 2 --binary_run_masks

`--binary_run_masks` (diam) gives each support the binary mask of the one class it was drawn for, as the evaluation
did before a support was annotated for every novel class it holds (the defect it shows: gamma = 10 never predicts a
novel pixel when supports hold several novel classes). Episodes as `scripts/camvid_benchmark.py` samples them (seed
42; diam supports at 1,582 px, not exclusive); fine-tuning at the feature resolution unless a variant says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf.adaptation import AdaptationConfig, adapt_classifier, predict
from gfss_hf.data.camvid import CAMVID_MIN_PIXELS
from gfss_hf.data.episodes import build_episodes
from gfss_hf.data.sources import load_image_source
from gfss_hf.data.splits import IGNORE_INDEX, get_split
from gfss_hf.evaluation import FeatureCache

# name -> AdaptationConfig fields (on top of the paper's defaults and the feature-resolution loss)
VARIANTS = {
    "fss": {"method": "fss"},
    "fss_lr1": {"method": "fss", "lr": 1.0},
    "fss_steps300": {"method": "fss", "steps": 300},
    "fss_weighted": {"method": "fss", "ce_weighting": "reference"},
    "gamma0": {"gamma": 0.0},
    "gamma10": {"gamma": 10.0},
    "gamma10_skip": {"gamma": 10.0, "kd_skip_novel": True},
    "gamma0_input": {"gamma": 0.0, "loss_resolution": "input"},
    "gamma0_lr1": {"gamma": 0.0, "lr": 1.0},
    "gamma0_steps300": {"gamma": 0.0, "steps": 300},
    "gamma0_weighted": {"gamma": 0.0, "ce_weighting": "reference"},
    "gamma0_prototype": {"gamma": 0.0, "novel_init": "prototype"},
    "gamma0_prototype_only": {"gamma": 0.0, "novel_init": "prototype", "steps": 0},
    "gamma0_normalized": {"gamma": 0.0, "normalize_features": True},
    "gamma0_transductive": {"gamma": 0.0, "transductive": True},
}
# paper protocol: the benchmark's two trivial baselines on the same episodes (no fine-tuning)
BASELINES = ("all_novel", "pasted_mask")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a pre-trained CamVid model folder")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--cache_dir", default=None, help="datasets cache of the CamVid index")
    parser.add_argument("--fold", type=int, default=None, help="default: the model's")
    parser.add_argument("--protocol", default="paper", choices=("paper", "diam"))
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--episodes", type=int, default=60, help="paper: episodes per shot count")
    parser.add_argument("--runs", type=int, default=2, help="diam: support sets")
    parser.add_argument("--support_split", default="train", choices=("train", "val"), help="paper supports")
    parser.add_argument("--variants", nargs="+", default=["fss", "gamma0", "gamma10", "gamma10_skip"])
    parser.add_argument("--binary_run_masks", action="store_true", help="diam: the old binary support masks")
    parser.add_argument("--stats", action="store_true", help="feature / row scale, teacher background probability")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.variants) - set(VARIANTS) - set(BASELINES))
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)} and, paper only, {list(BASELINES)}")
    if args.protocol == "diam" and set(args.variants) & set(BASELINES):
        parser.error(f"the baselines {list(BASELINES)} are scored on paper episodes only")
    return args


class Pooled:
    """Per-class true / false positive and false negative pixel counts, summed over episodes."""

    def __init__(self):
        self.counts: dict[int, np.ndarray] = {}

    def update(self, class_id: int, predicted: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> None:
        predicted, truth = predicted & valid, truth & valid
        add = [int((predicted & truth).sum()), int((predicted & ~truth).sum()), int((~predicted & truth).sum())]
        self.counts[class_id] = self.counts.get(class_id, np.zeros(3, np.int64)) + add

    def summary(self, names: dict[int, str]) -> dict:
        out = {"iou": {}, "precision": {}, "recall": {}, "predicted_over_true": {}}
        for c, (tp, fp, fn) in sorted(self.counts.items()):
            name = names[c]
            out["iou"][name] = round(100 * tp / max(1, tp + fp + fn), 1)
            out["precision"][name] = round(100 * tp / max(1, tp + fp), 1)
            out["recall"][name] = round(100 * tp / max(1, tp + fn), 1)
            out["predicted_over_true"][name] = round((tp + fp) / max(1, tp + fn), 2)
        out["novel_miou"] = round(float(np.mean(list(out["iou"].values()))), 1)
        return out


def feature_stats(model, cache, ids) -> dict:
    """Scale of the features and of the pre-trained rows, and the teacher's probability of the background row."""
    features = cache.features("val", ids)
    rows = model.classifier.weight.detach().flatten(1)
    logits = torch.einsum("cd,ndhw->nchw", rows, features)
    return {
        "feature_norm_mean": round(float(features.norm(dim=1).mean()), 2),
        "row_norms": [round(float(v), 2) for v in rows.norm(dim=1)],
        "top_logit_mean": round(float(logits.amax(1).mean()), 2),
        "teacher_background_probability_mean": round(float(torch.softmax(logits, 1)[:, 0].mean()), 4),
    }


def paper_variant(model, cache, episodes, config, base_rows, pooled) -> None:
    for spec in episodes:
        c = spec.class_ids[0]
        shots = len(spec.support_ids[c])
        features = cache.features(spec.support_list, spec.support_ids[c])
        labels = torch.from_numpy(cache.labels(spec.support_list, spec.support_ids[c]).astype(np.int64))
        masks = torch.where(labels == IGNORE_INDEX, IGNORE_INDEX, (labels == c).long())
        truth = torch.from_numpy(cache.labels("val", [spec.query_id]).astype(np.int64))[0]
        if config in BASELINES:  # the whole canvas, or the union of the support masks pasted onto the query
            predicted = torch.ones_like(truth, dtype=torch.bool) if config == "all_novel" else (masks == 1).any(0)
            pooled.update(c, predicted, truth == c, truth != IGNORE_INDEX)
            continue
        query = cache.features("val", [spec.query_id])
        if config.method == "fss":
            clf = adapt_classifier(model, features, masks, config, seeds=spec.index)
            predicted = predict(query, clf, size=truth.shape)[0].argmax(0) == 1
        else:
            clf = adapt_classifier(
                model,
                features[None],
                masks[None],
                config,
                num_teacher_rows=base_rows,
                support_classes=torch.zeros(1, shots, dtype=torch.long),
                num_novel_classes=1,
                seeds=[spec.index],
                query_features=query[None] if config.transductive else None,
            )
            predicted = predict(query[None], clf, size=truth.shape)[0, 0].argmax(0) == base_rows
        pooled.update(c, predicted, truth == c, truth != IGNORE_INDEX)


def diam_variant(model, cache, episodes, config, split, base_rows, binary, pooled) -> None:
    rank = {c: r for r, c in enumerate(split.novel_ids)}
    for run in sorted({s.run for s in episodes}):
        specs = [s for s in episodes if s.run == run]
        pairs = [(c, i) for c in sorted(specs[0].support_ids) for i in specs[0].support_ids[c]]
        ids = [i for _, i in pairs]
        features = cache.features("val", ids)
        labels = torch.from_numpy(cache.labels("val", ids).astype(np.int64))
        maps = torch.zeros_like(labels)
        annotated = torch.zeros(len(ids), len(rank), dtype=torch.bool)
        for k, (c, _) in enumerate(pairs):
            for novel, r in rank.items():
                if novel == c or (not binary and bool((labels[k] == novel).any())):
                    maps[k][labels[k] == novel] = r + 1
                    annotated[k, r] = True
        maps[labels == IGNORE_INDEX] = IGNORE_INDEX
        clf = adapt_classifier(
            model,
            features,
            maps,
            config,
            num_teacher_rows=base_rows,
            num_novel_classes=len(rank),
            annotated=annotated,
            seeds=0,
        )
        for spec in specs:
            truth = torch.from_numpy(cache.labels("val", [spec.query_id]).astype(np.int64))[0]
            rows = predict(cache.features("val", [spec.query_id]), clf, size=truth.shape)[0].argmax(0)
            for novel, r in rank.items():
                pooled.update(novel, rows == base_rows + r, truth == novel, truth != IGNORE_INDEX)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = GFSSModel.from_pretrained(args.model).eval()
    processor = GFSSImageProcessor.from_pretrained(args.model)
    fold = args.fold if args.fold is not None else int(getattr(model.config, "fold", 0) or 0)
    split = get_split("camvid", fold)
    common = {"fold": fold, "data_dir": args.data_dir, "cache_dir": args.cache_dir}
    val = load_image_source("camvid", "val", **common)
    train = load_image_source("camvid", "train", **common)
    cache = FeatureCache(model, processor, {"val": val, "train": train})
    base_rows = len(split.base_ids) + 1
    names = {c: split.class_names[c - 1] for c in split.novel_ids}
    if args.stats:
        print(json.dumps({"stats": feature_stats(model, cache, val.ids[:20])}), flush=True)
    for shots in args.shots:
        if args.protocol == "paper":
            episodes = build_episodes(
                "paper",
                split,
                val,
                shots=shots,
                num_episodes=args.episodes,
                seed=42,
                train_source=train,
                support_split=args.support_split,
            )
        else:
            episodes = build_episodes(
                "diam", split, val, shots=shots, runs=args.runs, seed=42, exclusive=False, min_pixels=CAMVID_MIN_PIXELS
            )
        for variant in args.variants:
            if variant in BASELINES:
                config = variant
            else:
                config = AdaptationConfig(**{"loss_resolution": "feature", **VARIANTS[variant]})
            pooled, start = Pooled(), time.time()
            with torch.enable_grad():
                if args.protocol == "paper":
                    paper_variant(model, cache, episodes, config, base_rows, pooled)
                else:
                    diam_variant(model, cache, episodes, config, split, base_rows, args.binary_run_masks, pooled)
            row = {"protocol": args.protocol, "shots": shots, "variant": variant}
            if args.protocol == "paper":
                row["support_split"] = args.support_split
            else:
                row["binary_run_masks"] = args.binary_run_masks
            row.update(pooled.summary(names), seconds=round(time.time() - start, 1))
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
