"""The main job end to end on the embedded procedural dataset (`make demo`).

1. Pre-trains a small PSPNet twice on the base classes of fold 0: cross-entropy only, and cross-entropy + the pixel
   contrastive loss.
2. Evaluates both with the `paper` protocol, 1-shot and 5-shot: FSS 2-way, GFSS (B+2)-way with gamma 0 and gamma 10,
   and gamma 10 with the distillation restricted to pixels not labelled as the novel class.
3. Prints a table shaped like the paper's Tables 1-4 and writes, under `--output_dir`: `model_ce/` and
   `model_contrastive/` (loadable with `AutoModel.from_pretrained`, each with its model card `README.md`),
   `results.json`, `results.md` and `qualitative.png`.

    python scripts/demo.py --output_dir demo_output            # the two models in parallel, one per core
    python scripts/demo.py --output_dir /tmp/d --quick         # the reduced budget the tests run

The two models are independent: with `--jobs 2` (the default on a machine with 2 or more cores) each is
pre-trained and evaluated in its own process (this script with `--model`), on half the cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import gfss_hf
from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf._io import atomic_write_bytes, atomic_write_text
from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.cards import render_model_card, save_model_card
from gfss_hf.data.episodes import build_episodes
from gfss_hf.data.splits import get_split
from gfss_hf.data.synthetic import SyntheticSegmentation
from gfss_hf.evaluation import EvaluationOptions, evaluate_episodes
from gfss_hf.learning import episode_figure_row
from gfss_hf.training import pretrain
from gfss_hf.training_config import TrainingConfig
from gfss_hf.visualization import episode_figure

CONFIG = Path(__file__).resolve().parent / "configs" / "synthetic.yaml"
# (folder, label, contrastive weight, novel pixels labelled background during pre-training (BAM's convention)
# instead of ignored). The third is opt-in (`--models`): it costs another pre-training.
MODELS = (
    ("model_ce", "CE", 0.0, False),
    ("model_contrastive", "CE + contrastive", 0.1, False),
    ("model_ce_novel_bg", "CE, novel pixels = background", 0.0, True),
)
DEFAULT_MODELS = ("model_ce", "model_contrastive")
# The model of the figure, of `model_card.md` and of the Space's default: the better of the two in the measured
# demo (validation base mIoU 51.6 % against 40.6 % for the contrastive model on 2026-12-01, and every GFSS
# number; see the README).
SHOWCASE = "model_ce"
# (key, row label, AdaptationConfig overrides). FSS numbers come with every `paper` evaluation.
VARIANTS = (
    ("gamma0", "GFSS (B+2)-way, gamma = 0", {"gamma": 0.0}),
    ("gamma10", "GFSS (B+2)-way, gamma = 10", {"gamma": 10.0}),
    ("gamma10_skip", "GFSS, gamma = 10, KD off novel pixels", {"gamma": 10.0, "kd_skip_novel": True}),
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=None, help="pre-training steps per model (default: YAML)")
    parser.add_argument("--episodes", type=int, default=300, help="episodes per evaluation")
    parser.add_argument("--val_images", type=int, default=120, help="val images episodes are drawn from")
    parser.add_argument("--adaptation_steps", type=int, default=100)
    parser.add_argument(
        "--loss_resolution",
        default="feature",
        choices=("feature", "input"),
        help="fine-tuning loss on feature-size labels (default here: 7-18x faster at 96 px, same "
        "numbers within noise on this dataset) or on input-size logits (the paper's, exact)",
    )
    parser.add_argument("--seed", type=int, default=42, help="episode seed")
    parser.add_argument("--quick", action="store_true", help="tiny budget (tests): few steps, episodes, images")
    parser.add_argument("--overwrite", action="store_true", help="retrain models that already exist")
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        choices=[m[0] for m in MODELS],
        help="which pre-trainings to run (model_ce_novel_bg: novel pixels labelled background, "
        "BAM's convention, instead of ignored)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(len(DEFAULT_MODELS), os.cpu_count() or 1),
        help="models pre-trained and evaluated in parallel processes (default: one per core, max 2)",
    )
    parser.add_argument(
        "--model",
        choices=[m[0] for m in MODELS],
        help="(internal) only this model: pre-train, evaluate, write <output_dir>/<model>/demo.json",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if "model_ce" not in args.models:
        parser.error("--models must include model_ce: it is the model of the figure, the card and the Space.")
    return args


def selected(args) -> list[tuple]:
    """The entries of MODELS named by --models, in MODELS order."""
    return [m for m in MODELS if m[0] in args.models]


def train_models(args, out: Path, models) -> dict[str, Path]:
    paths = {}
    for folder, label, weight, novel_bg in models:
        target = out / folder
        paths[folder] = target
        if (target / "model.safetensors").is_file() and not args.overwrite:
            print(f"[demo] {label}: reusing {target} (pass --overwrite to retrain)", flush=True)
            continue
        overrides = {
            "output_dir": str(target),
            "fold": args.fold,
            "contrastive_weight": weight,
            "num_workers": 0,
            "novel_to_background": novel_bg,
        }
        if args.max_steps is not None:
            overrides["max_steps"] = args.max_steps
        if args.quick:
            overrides.update(num_train_images=64, num_val_images=16, max_steps=args.max_steps or 6, batch_size=4)
        config = TrainingConfig.from_yaml(CONFIG, overrides=overrides)
        print(
            f"[demo] pre-training {label} ({config.model_settings['backbone']}, {config.image_size} px) -> {target}",
            flush=True,
        )
        start = time.time()
        summary = pretrain(config)
        base = (summary.get("final_eval") or {}).get("base_miou")
        print(
            f"[demo] {label}: {summary['global_step']} steps in {time.time() - start:.0f} s"
            + (f", val base mIoU {100 * base:.1f}" if base is not None else ""),
            flush=True,
        )
    return paths


def evaluate_models(args, paths, split, val, models) -> dict:
    results = {}
    for folder, label, *_ in models:
        model = GFSSModel.from_pretrained(paths[folder]).eval()
        processor = GFSSImageProcessor.from_pretrained(paths[folder])
        results[folder] = {}
        for shots in (1, 5):
            episodes = build_episodes("paper", split, val, shots=shots, num_episodes=args.episodes, seed=args.seed)
            for key, name, overrides in VARIANTS:
                adaptation = AdaptationConfig(
                    steps=args.adaptation_steps, loss_resolution=args.loss_resolution, **overrides
                )
                options = EvaluationOptions(adaptation=adaptation, progress=True)
                print(f"[demo] {label}, {shots}-shot, {name}", flush=True)
                result = evaluate_episodes(
                    model, episodes, split=split, val_source=val, processor=processor, options=options
                )
                results[folder][f"{shots}shot/{key}"] = {
                    "metrics": result.metrics,
                    "num_episodes": result.num_episodes,
                    "episodes_hash": result.episodes_hash,
                    "adaptation": adaptation.to_dict(),
                }
    return results


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}"


def results_table(results, models=MODELS) -> str:
    """Rows: pre-training x method; columns: 1-shot and 5-shot novel / base / mean mIoU (percent)."""
    header = (
        "| pre-training | method | 1-shot novel | 1-shot base | 1-shot mean | 5-shot novel | 5-shot base "
        "| 5-shot mean |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for folder, label, *_ in models:
        if folder not in results:
            continue
        res = results[folder]
        cells = []
        for shots in (1, 5):
            m = res[f"{shots}shot/gamma0"]["metrics"]
            cells += [_pct(m["fss_novel_miou"]), "-", "-"]
        lines.append(f"| {label} | FSS 2-way | " + " | ".join(cells) + " |")
        for key, name, _ in VARIANTS:
            cells = []
            for shots in (1, 5):
                m = res[f"{shots}shot/{key}"]["metrics"]
                cells += [_pct(m["gfss_novel_miou"]), _pct(m["gfss_base_miou"]), _pct(m["gfss_mean_miou"])]
            lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- qualitative figure ---------------------------------------------------------------------------------------------
def qualitative_figure(model_dir: Path, split, val, path: Path, seed: int, steps: int, num: int = 4) -> None:
    """Support with its mask, query, ground truth, FSS, GFSS gamma 0 and gamma 10 predictions for a few episodes,
    with a legend of the classes shown."""
    model = GFSSModel.from_pretrained(model_dir).eval()
    processor = GFSSImageProcessor.from_pretrained(model_dir)
    rows = []
    for spec in build_episodes("paper", split, val, shots=1, num_episodes=num, seed=seed):
        novel = spec.class_ids[0]
        support = val.get_by_id(spec.support_ids[novel][0])
        query = val.get_by_id(spec.query_id)
        rows.append(
            episode_figure_row(
                model,
                processor,
                support,
                query,
                novel,
                split.base_ids,
                split.class_names[novel - 1],
                AdaptationConfig(steps=steps, seed=spec.index),
            )
        )
    # display ids: dataset ids (0 background, 1..20 classes)
    names = {0: "background", **dict(enumerate(split.class_names, start=1)), 255: "ignore"}
    figure = episode_figure(rows, names)
    buffer = io.BytesIO()
    figure.save(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _val_split(args):
    """Episodes come from a val split the pre-training never saw (its own seed offset in the renderer)."""
    training = TrainingConfig.from_yaml(CONFIG)
    return SyntheticSegmentation(
        split="val", num_images=args.val_images, image_size=training.image_size, seed=training.dataset_seed
    )


def _relay(stream, label: str) -> None:
    for line in iter(stream.readline, ""):
        print(f"[{label}] {line}", end="", flush=True)


def job_env(slot: int, threads: int, terminal: bool) -> dict[str, str]:
    """The environment of the job in `slot`: its thread budget and, on a terminal, its own line for progress bars
    (tqdm reads `TQDM_POSITION`; without it the jobs' bars overwrite each other on one line). Not in a log file,
    where positioned bars write cursor movements."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("TQDM_POSITION", None)
    if terminal:
        env["TQDM_POSITION"] = str(slot)
    return env


def run_parallel(args, argv, out: Path) -> tuple[dict[str, Path], dict]:
    """Each model in its own process (`--model`), on `cpu_count // jobs` threads; their printed lines are relayed
    here with a prefix (progress bars go to stderr as they are, one line per job on a terminal)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    terminal = args.jobs > 1 and sys.stderr.isatty()
    pending = selected(args)
    paths, results = {}, {}
    while pending:
        batch, pending = pending[: args.jobs], pending[args.jobs :]
        procs = []
        for slot, (folder, label, *_) in enumerate(batch):
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--model", folder]
            env = job_env(slot, threads, terminal)
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, bufsize=1)
            relay = threading.Thread(target=_relay, args=(proc.stdout, label), daemon=True)
            relay.start()
            procs.append((folder, label, proc, relay))
        for folder, label, proc, relay in procs:
            code = proc.wait()
            relay.join()
            if code != 0:
                raise SystemExit(
                    f"[demo] the {label} job failed (exit {code}); its output is above. Re-run it "
                    f"alone with: python scripts/demo.py {' '.join(argv)} --model {folder}"
                )
            paths[folder] = out / folder
            results[folder] = json.loads((out / folder / "demo.json").read_text(encoding="utf-8"))
    return paths, results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.episodes = min(args.episodes, 6)
        args.val_images = min(args.val_images, 24)
        args.adaptation_steps = min(args.adaptation_steps, 10)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.time()
    split = get_split("synthetic", args.fold)
    if args.model is not None:  # one job of a parallel run
        models = [m for m in MODELS if m[0] == args.model]
        paths = train_models(args, out, models)
        results = evaluate_models(args, paths, split, _val_split(args), models)
        atomic_write_text(out / args.model / "demo.json", json.dumps(results[args.model], default=float))
        return 0
    if args.jobs > 1:
        paths, results = run_parallel(args, argv, out)
    else:
        paths = train_models(args, out, selected(args))
        results = evaluate_models(args, paths, split, _val_split(args), selected(args))
    val = _val_split(args)
    table = results_table(results)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, {args.jobs} job(s)"
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {
        "gfss_hf_version": gfss_hf.__version__,
        "dataset": "synthetic",
        "fold": args.fold,
        "protocol": "paper",
        "episodes": args.episodes,
        "val_images": args.val_images,
        "seed": args.seed,
        "date": stamp,
        "machine": machine,
        "results": results,
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    header = (
        f"Procedural dataset, fold {args.fold}, `paper` protocol, {args.episodes} episodes per cell, "
        f"{args.adaptation_steps} fine-tuning steps ({args.loss_resolution}-resolution loss), mIoU in %; "
        f"{stamp}, {machine}; {time.time() - start:.0f} s.\n\n"
    )
    atomic_write_text(out / "results.md", header + table + "\n")
    # Model cards: the main method (gamma = 10) of each model, 1-shot and 5-shot.
    for folder, *_ in selected(args):
        entries = []
        for shots in (1, 5):
            m = results[folder][f"{shots}shot/gamma10"]["metrics"]
            entries.append(
                {
                    "protocol": "paper",
                    "dataset": "synthetic",
                    "fold": args.fold,
                    "shots": shots,
                    # The 2-way number of the FSS head (gamma plays no part in it); GFSS numbers of gamma = 10.
                    "metrics": {
                        "fss_novel_miou": results[folder][f"{shots}shot/gamma0"]["metrics"]["fss_novel_miou"],
                        "gfss_novel_miou": m["gfss_novel_miou"],
                        "gfss_base_miou": m["gfss_base_miou"],
                    },
                    "episodes": args.episodes,
                }
            )
        card = render_model_card(
            paths[folder],
            {"results": entries},
            repo_id=f"gfss-hf/gfss-synthetic-{folder}",
            model_name=f"gfss-synthetic-{folder}",
        )
        save_model_card(card, paths[folder] / "README.md")
    shutil.copyfile(paths[SHOWCASE] / "README.md", out / "model_card.md")
    qualitative_figure(paths[SHOWCASE], split, val, out / "qualitative.png", args.seed, args.adaptation_steps)
    print()
    print(header + table)
    folders = ", ".join(f"{m[0]}/" for m in selected(args))
    print(
        f"\n[demo] done in {time.time() - start:.0f} s; wrote {out}/: {folders}, results.json, results.md, "
        "model_card.md, qualitative.png",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
