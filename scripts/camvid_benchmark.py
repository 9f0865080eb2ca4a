"""CamVid as a real GFSS benchmark on a CPU: regenerates the README's CamVid table.

Per fold (`gfss_hf.data.splits.CAMVID_FOLDS`: 0 = large objects Tree / SignSymbol / Car, 1 = thin objects Pole /
Pedestrian / Bicyclist):

1. pre-trains the CPU recipe (`scripts/configs/camvid.yaml`) on the train split's base classes, cross-entropy only
   and cross-entropy + the pixel contrastive loss (`--models`);
2. evaluates, 1-shot and 5-shot, the `paper` protocol (one novel class per episode, queries from val, supports from
   train with `--support_split train`, the default here: all 101 val images come from one drive) and the `diam`
   protocol (all novel classes at once, `--runs` support sets from val; on CamVid with supports at the paper's
   1,582 px and not exclusive, as no val image holds one novel class without the others, each support annotated for
   every novel class it holds): FSS 2-way (paper only), GFSS with gamma 0, gamma 10, and gamma 10 with the
   distillation off novel pixels;
3. scores two trivial baselines on the very same episodes, per novel class, pooled over episodes like the model's
   novel IoU: every query pixel predicted as the novel class, and the support mask(s) of the class pasted onto the
   query (same image size; CamVid's scenes share a road layout, which is what this baseline measures);
4. writes `results.json` (every number, per-class novel IoU, timings), `results.md` (the tables) and
   `qualitative.png` (support with its mask, query, ground truth, FSS, GFSS gamma 0 and gamma 10; 1-shot, fold 0
   or the first fold run, CE model), drawn with `gfss_hf.visualization`.

    OMP_NUM_THREADS=1 python scripts/camvid_benchmark.py --data_dir /data/CamVid --output_dir camvid_results
    python scripts/camvid_benchmark.py --data_dir /data/CamVid --output_dir /tmp/q --quick   # the test's budget

Duration, measured on one core of the 2-core development machine with the other core busy (2026-12-01), the
defaults (500 paper episodes and 5 diam runs per shot count, 3 GFSS variants, 100 fine-tuning steps at feature
resolution): pre-training 10-11 min per model (720 steps of 8 images; CE + contrastive no slower), evaluation 6.0-6.4
min per model; the full table (2 folds x 2 models) 68 min. `--quick` takes ~25 s.

The test split is never read.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import gfss_hf
from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf._io import atomic_write_bytes, atomic_write_text
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.data.camvid import CAMVID_MIN_PIXELS
from gfss_hf.data.episodes import build_episodes
from gfss_hf.data.sources import load_image_source
from gfss_hf.data.splits import get_split
from gfss_hf.evaluation import EvaluationOptions, evaluate_episodes
from gfss_hf.learning import episode_figure_row
from gfss_hf.training import pretrain
from gfss_hf.training_config import TrainingConfig
from gfss_hf.visualization import episode_figure

CONFIG = Path(__file__).resolve().parent / "configs" / "camvid.yaml"
# (key, label, contrastive weight)
MODELS = (("ce", "CE", 0.0), ("contrastive", "CE + contrastive", 0.1))
# (key, row label, AdaptationConfig overrides); FSS numbers come with every paper evaluation.
VARIANTS = (
    ("gamma0", "GFSS, gamma = 0", {"gamma": 0.0}),
    ("gamma10", "GFSS, gamma = 10", {"gamma": 10.0}),
    ("gamma10_skip", "GFSS, gamma = 10, KD off novel pixels", {"gamma": 10.0, "kd_skip_novel": True}),
)
PROTOCOLS = ("paper", "diam")
DIAM_MIN_PIXELS = CAMVID_MIN_PIXELS
SHOTS = (1, 5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="CamVid in the SegNet layout (train/ trainannot/ val/ ...)")
    parser.add_argument("--output_dir", default="camvid_results")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--models", nargs="+", default=[m[0] for m in MODELS], choices=[m[0] for m in MODELS])
    parser.add_argument("--episodes", type=int, default=500, help="paper protocol: episodes per shot count")
    parser.add_argument("--runs", type=int, default=5, help="diam protocol: support sets")
    parser.add_argument("--adaptation_steps", type=int, default=100)
    parser.add_argument("--loss_resolution", default="feature", choices=("feature", "input"))
    parser.add_argument(
        "--support_split",
        default="train",
        choices=("train", "val"),
        help="paper protocol: where supports come from (train: another drive than the val queries)",
    )
    parser.add_argument("--max_steps", type=int, default=None, help="pre-training steps (default: the YAML's)")
    parser.add_argument("--seed", type=int, default=42, help="episode seed")
    parser.add_argument("--overwrite", action="store_true", help="retrain models that already exist")
    parser.add_argument("--quick", action="store_true", help="tiny budget (the test): few images, steps, episodes")
    return parser.parse_args(argv)


def quick_data(data_dir: Path, root: Path, num_train: int = 8, num_val: int = 24) -> Path:
    """A CamVid folder of a few images spread over each list (every k-th), linked (never copied) from `data_dir`,
    for `--quick`: 5-shot diam needs 3 x 5 distinct val supports that hold the novel classes."""
    for split, num in (("train", num_train), ("val", num_val)):
        names = sorted(p.name for p in (data_dir / split).iterdir())
        picked = names[:: max(1, len(names) // num)][:num]
        for sub in (split, f"{split}annot"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for name in picked:
                if not (root / sub / name).exists():
                    os.symlink((data_dir / sub / name).resolve(), root / sub / name)
    return root


def train_model(args, data_dir: Path, fold: int, key: str, weight: float, target: Path) -> dict:
    if (target / "model.safetensors").is_file() and not args.overwrite:
        print(f"[camvid] fold {fold} {key}: reusing {target}", flush=True)
        return {"reused": True}
    overrides = {
        "output_dir": str(target),
        "fold": fold,
        "data_dir": str(data_dir),
        "contrastive_weight": weight,
        "report_to": "none",
    }
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    if args.quick:
        overrides.update(max_steps=args.max_steps or 2, batch_size=2, num_val_images=2, eval_every_epochs=0)
    config = TrainingConfig.from_yaml(CONFIG, overrides=overrides)
    start = time.time()
    summary = pretrain(config)
    seconds = time.time() - start
    base = (summary.get("final_eval") or {}).get("base_miou")
    print(f"[camvid] fold {fold} {key}: {summary['global_step']} steps in {seconds:.0f} s, val base mIoU {base}")
    return {"steps": summary["global_step"], "seconds": seconds, "val_base_miou": base}


def baseline_ious(episodes, split, val, support_source) -> dict[str, dict[str, float]]:
    """
    The two trivial baselines on `episodes`: per novel class, IoU pooled over the episodes of that class (void
    ignored), of "every query pixel is the class" and of "the union of the class's support masks, pasted onto the
    query". Returns `{baseline: {class name: IoU, "mean": mean over classes}}`.
    """
    pooled = {name: {} for name in ("all_novel", "support_mask")}
    for spec in episodes:
        target = np.asarray(val.get_by_id(spec.query_id)["label"])
        valid = target != 255
        for c in spec.class_ids:
            truth = (target == c) & valid
            pasted = np.zeros_like(truth)
            for image_id in spec.support_ids[c]:
                mask = np.asarray(support_source.get_by_id(image_id)["label"]) == c
                if mask.shape == pasted.shape:
                    pasted |= mask
            for name, guess in (("all_novel", valid), ("support_mask", pasted & valid)):
                inter, union = pooled[name].get(c, (0, 0))
                pooled[name][c] = (inter + int((guess & truth).sum()), union + int((guess | truth).sum()))
    out = {}
    for name, per_class in pooled.items():
        values = {split.class_names[c - 1]: i / u for c, (i, u) in sorted(per_class.items()) if u > 0}
        out[name] = {**values, "mean": float(np.mean(list(values.values()))) if values else float("nan")}
    return out


def evaluate_model(args, model_dir: Path, split, val, train, episode_sets) -> dict:
    model = GFSSModel.from_pretrained(model_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(model_dir)
    out = {}
    for (protocol, shots), episodes in episode_sets.items():
        for key, name, overrides in VARIANTS:
            adaptation = AdaptationConfig(
                steps=args.adaptation_steps, loss_resolution=args.loss_resolution, **overrides
            )
            options = EvaluationOptions(adaptation=adaptation, progress=not args.quick)
            start = time.time()
            result = evaluate_episodes(
                model, episodes, split=split, val_source=val, train_source=train, processor=processor, options=options
            )
            per_class = result.per_class.get("gfss_novel") if protocol == "paper" else _mean_runs(result.per_class)
            out[f"{protocol}/{shots}shot/{key}"] = {
                "metrics": result.metrics,
                "novel_per_class": {n: v for n, v in (per_class or {}).items() if n in split.novel_names},
                "fss_per_class": {n: v for n, v in result.per_class.get("fss", {}).items() if n in split.novel_names},
                "num_episodes": result.num_episodes,
                "episodes_hash": result.episodes_hash,
                "seconds": time.time() - start,
            }
            print(f"[camvid] {model_dir.name} {protocol} {shots}-shot {name}: {time.time() - start:.0f} s", flush=True)
    return out


def _mean_runs(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """diam: the per-class IoU of each run, averaged over the runs (a class missing from a run is left out)."""
    values: dict[str, list[float]] = {}
    for run in per_class.values():
        for name, value in run.items():
            values.setdefault(name, []).append(value)
    return {name: float(np.mean(v)) for name, v in values.items()}


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def fold_tables(fold_result: dict, split) -> str:
    """The tables of one fold: per protocol, rows = model x method (+ baselines), columns = 1/5-shot novel / base /
    mean mIoU; then per-class novel IoU (FSS, GFSS gamma = 0 and gamma = 10, the baselines)."""
    lines = []
    for protocol in PROTOCOLS:
        novel_key, base_key = (
            ("gfss_novel_miou", "gfss_base_miou") if protocol == "paper" else ("novel_miou", "base_miou")
        )
        lines += [
            f"\n**Fold {split.fold} ({', '.join(split.novel_names)} novel), `{protocol}` protocol**\n",
            "| pre-training | method | 1-shot novel | 1-shot base | 5-shot novel | 5-shot base |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for model_key, label, _ in MODELS:
            res = fold_result["models"].get(model_key)
            if res is None:
                continue
            if protocol == "paper":
                cells = [
                    c for s in SHOTS for c in (_pct(res[f"paper/{s}shot/gamma0"]["metrics"]["fss_novel_miou"]), "-")
                ]
                lines.append(f"| {label} | FSS 2-way | " + " | ".join(cells) + " |")
            for key, name, _ in VARIANTS:
                cells = []
                for s in SHOTS:
                    m = res[f"{protocol}/{s}shot/{key}"]["metrics"]
                    cells += [_pct(m.get(novel_key)), _pct(m.get(base_key))]
                lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
        for name, label in (("all_novel", "every pixel = novel class"), ("support_mask", "support mask pasted")):
            cells = [
                c for s in SHOTS for c in (_pct(fold_result["baselines"][f"{protocol}/{s}shot"][name]["mean"]), "-")
            ]
            lines.append(f"| baseline | {label} | " + " | ".join(cells) + " |")
        lines += [
            f"\nPer-class novel IoU, `{protocol}`, 1-shot / 5-shot:\n",
            "| row | " + " | ".join(split.novel_names) + " |",
            "|---|" + "---:|" * len(split.novel_names),
        ]
        for model_key, label, _ in MODELS:
            res = fold_result["models"].get(model_key)
            if res is None:
                continue
            rows = [
                ("gamma0", f"{label}, GFSS gamma = 0", "novel_per_class"),
                ("gamma10", f"{label}, GFSS gamma = 10", "novel_per_class"),
            ]
            if protocol == "paper":
                rows.insert(0, ("gamma0", f"{label}, FSS 2-way", "fss_per_class"))
            for key, row_label, field in rows:
                cells = [
                    "/".join(_pct(res[f"{protocol}/{s}shot/{key}"][field].get(n)) for s in SHOTS)
                    for n in split.novel_names
                ]
                lines.append(f"| {row_label} | " + " | ".join(cells) + " |")
        for name, label in (("all_novel", "every pixel = novel"), ("support_mask", "support mask pasted")):
            cells = [
                "/".join(_pct(fold_result["baselines"][f"{protocol}/{s}shot"][name].get(n)) for s in SHOTS)
                for n in split.novel_names
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def qualitative_figure(
    model_dir: Path, split, val, sources, episodes, path: Path, adaptation: AdaptationConfig, num: int = 3
) -> None:
    """Support with its mask, query, ground truth, FSS, GFSS gamma 0 and gamma 10 for the first `num` episodes (the
    table's fine-tuning settings), with a legend of every class shown."""
    model = GFSSModel.from_pretrained(model_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(model_dir)
    rows = []
    for spec in episodes[:num]:
        novel = spec.class_ids[0]
        support = sources[spec.support_list].get_by_id(spec.support_ids[novel][0])
        query = val.get_by_id(spec.query_id)
        rows.append(
            episode_figure_row(
                model, processor, support, query, novel, split.base_ids, split.class_names[novel - 1], adaptation
            )
        )
    # CamVid has no background class: id 0 is the background row (GFSS) or "not the class" (FSS, support mask).
    names = {0: "background / not the class", **dict(enumerate(split.class_names, start=1)), 255: "void (ignored)"}
    canvas = episode_figure(rows, names)
    buffer = io.BytesIO()
    canvas.save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.episodes, args.runs, args.adaptation_steps = min(args.episodes, 3), 1, min(args.adaptation_steps, 3)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir)
    if args.quick:
        data_dir = quick_data(data_dir, out / "quick_data")
    start = time.time()
    results = {}
    figure_done = False
    for fold in args.folds:
        split = get_split("camvid", fold)
        fold_result = {"novel": list(split.novel_names), "pretraining": {}, "models": {}, "baselines": {}}
        for key, _, weight in MODELS:
            if key in args.models:
                target = out / f"fold{fold}" / f"model_{key}"
                fold_result["pretraining"][key] = train_model(args, data_dir, fold, key, weight, target)
        common = dict(fold=fold, data_dir=str(data_dir), cache_dir=str(out / "cache"))
        val = load_image_source("camvid", "val", **common)
        train = load_image_source("camvid", "train", **common)
        sources = {"val": val, "train": train}
        episode_sets = {}
        for protocol in PROTOCOLS:
            for shots in SHOTS:
                episodes = build_episodes(
                    protocol,
                    split,
                    val,
                    shots=shots,
                    num_episodes=args.episodes,
                    seed=args.seed,
                    runs=args.runs,
                    train_source=train,
                    support_split=args.support_split if protocol == "paper" else None,
                    # diam on CamVid: no val image holds a novel class without another one, and SignSymbol / Car
                    # never cover DIaM's 9.4 % of a val image; supports at the paper threshold, not exclusive.
                    **({} if protocol == "paper" else {"exclusive": False, "min_pixels": DIAM_MIN_PIXELS}),
                )
                episode_sets[(protocol, shots)] = episodes
                support_source = sources[episodes[0].support_list]
                fold_result["baselines"][f"{protocol}/{shots}shot"] = baseline_ious(
                    episodes, split, val, support_source
                )
        for key, *_ in MODELS:
            if key in args.models:
                model_dir = out / f"fold{fold}" / f"model_{key}"
                fold_result["models"][key] = evaluate_model(args, model_dir, split, val, train, episode_sets)
        if not figure_done:
            model_key = "ce" if "ce" in args.models else args.models[0]
            qualitative_figure(
                out / f"fold{fold}" / f"model_{model_key}",
                split,
                val,
                sources,
                episode_sets[("paper", 1)],
                out / "qualitative.png",
                AdaptationConfig(steps=args.adaptation_steps, loss_resolution=args.loss_resolution),
            )
            figure_done = True
        results[f"fold{fold}"] = fold_result
    seconds = time.time() - start
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    payload = {
        "gfss_hf_version": gfss_hf.__version__,
        "dataset": "camvid",
        "folds": args.folds,
        "models": args.models,
        "episodes": args.episodes,
        "runs": args.runs,
        "adaptation_steps": args.adaptation_steps,
        "loss_resolution": args.loss_resolution,
        "support_split": args.support_split,
        "seed": args.seed,
        "quick": args.quick,
        "date": stamp,
        "machine": machine,
        "seconds": seconds,
        "results": results,
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    header = (
        f"CamVid (SegNet 11 classes), queries from val, paper-protocol supports from {args.support_split}; "
        f"{args.episodes} paper episodes and {args.runs} diam runs per shot count, {args.adaptation_steps} fine-tuning "
        f"steps ({args.loss_resolution}-resolution loss); mIoU in %; {stamp}, {machine}; {seconds / 60:.1f} min."
        + (" QUICK BUDGET: not a result." if args.quick else "")
    )
    tables = [fold_tables(results[f"fold{fold}"], get_split("camvid", fold)) for fold in args.folds]
    atomic_write_text(out / "results.md", header + "\n" + "\n".join(tables) + "\n")
    print(header + "\n" + "\n".join(tables))
    print(f"\n[camvid] done in {seconds:.0f} s; wrote {out}/results.json, results.md, qualitative.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
