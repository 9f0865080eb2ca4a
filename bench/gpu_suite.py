"""One command that measures gfss_hf on one CUDA device and writes a JSON report and a Markdown section.

Parts (each in its own try/except: a failing part records its error and the others still run; the exit code is 1
when any part failed):

1. `forward`: PSPNet forward (ResNet-50 deep stem, output stride 8, PPM, logits upsampled to the input) at 473 px,
   images/s at batch 1 and 16, in fp32, bf16 (autocast) and channels-last memory; peak memory.
2. `pretrain`: one pre-training step at the paper's recipe (473 px, batch 12, SGD momentum 0.9, weight decay 1e-4,
   lr 2.5e-3; label-smoothed CE, + 0.1 x pixel contrastive), fp32 and bf16 autocast: s/step, images/s, peak
   memory, and the projection of 100 PASCAL-5i epochs and 20 COCO-20i epochs.
3. `protocol`: the `paper` protocol through `gfss_hf.evaluation.evaluate_episodes` (feature cache, batched
   episodes) on procedural images rendered at 473 px with a random-weight model whose BatchNorm statistics are
   measured on those images (`bench/_calibration.py`, as `bench/evaluation.py` does): episodes/s for both loss
   resolutions, several episode batch sizes, the exact solver against the plain autograd reference (both in
   `gfss_hf._solver`, chosen by `AdaptationConfig.solver`; their metric sums are compared; this measurement is what
   the GPU default of `solver` awaits), and the projection of a 20,000-episode fold.

A global budget (`--budget_s`, from process start) skips what would not fit: a part, or a measurement whose
warm-up says it would overrun, is recorded as skipped. The report is rewritten (atomically) after every part, so a
run killed from outside still leaves the parts it finished.

    python bench/gpu_suite.py --output_dir outputs/gpu_suite                 # one CUDA device, ~5-8 minutes
    python bench/gpu_suite.py --output_dir /tmp/gpu_suite_dry --dry_run      # CPU, tiny sizes, < 1 minute

`--dry_run` runs the same code on CPU with a small timm ResNet-18 at 64 px, a few steps and episodes: its numbers
mean nothing, it checks that the suite runs (tests/test_benchmarks.py runs it). Nothing is downloaded.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the budget counts from here, imports included

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
from _calibration import recalibrate_batchnorm  # noqa: E402  (bench/, on the path when run as a script)
from evaluation import PoolSource, image_pool, min_pixels  # noqa: E402
from pretrain_step import build as build_pretraining_batch  # noqa: E402
from pretrain_step import contrastive_term  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from gfss_hf import GFSSConfig, GFSSImageProcessor, GFSSModel  # noqa: E402
from gfss_hf._io import atomic_write_text  # noqa: E402
from gfss_hf.adaptation import AdaptationConfig  # noqa: E402
from gfss_hf.data.episodes import build_episodes  # noqa: E402
from gfss_hf.data.splits import get_split  # noqa: E402
from gfss_hf.evaluation import EvaluationOptions, FeatureCache, evaluate_episodes  # noqa: E402

__all__ = ["PARTS", "Budget", "SuiteArguments", "main", "report_markdown", "run_suite", "write_report"]

PARTS = ("forward", "pretrain", "protocol")
REPORT_JSON = "gpu_suite.json"
REPORT_MD = "gpu_suite.md"
PASCAL_VAL_IMAGES = 1449  # PASCAL-5i val list: every image's features once per fold
FOLD_EPISODES = 20000


@dataclass
class SuiteArguments:
    """Arguments of the GPU suite (`--dry_run` replaces the sizes by a tiny CPU profile, see `dry_run_profile`)."""

    output_dir: str = field(metadata={"help": "Folder of gpu_suite.json and gpu_suite.md (created)."})
    dry_run: bool = field(default=False, metadata={"help": "CPU, tiny sizes, < 1 minute: checks the code path."})
    budget_s: float = field(
        default=450.0,
        metadata={
            "help": "Wall-clock budget from process start; what would not fit is skipped and recorded as skipped."
        },
    )
    device: str | None = field(default=None, metadata={"help": "Default: cuda (cpu with --dry_run)."})
    parts: list[str] = field(default_factory=lambda: list(PARTS), metadata={"help": f"Subset of {PARTS}."})
    backbone: str = "resnet50s"
    image_size: int = 473
    hidden_size: int = 512
    cudnn_benchmark: bool = field(
        default=False, metadata={"help": "torch.backends.cudnn.benchmark (the package's scripts leave it off)."}
    )
    forward_batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    forward_warmup: int = 3
    forward_iters: int = 10
    pretrain_batch_size: int = 12
    pretrain_warmup: int = 2
    pretrain_steps: int = 5
    pascal_train_images: int = field(default=4760, metadata={"help": "Images of one PASCAL-5i epoch (issue #19)."})
    coco_train_images: int = field(
        default=82783,
        metadata={"help": "Images of one COCO-20i epoch: all 82,783 COCO 2014 train images (an upper bound)."},
    )
    num_images: int = field(default=24, metadata={"help": "Procedural val images the protocol's episodes draw from."})
    scan_images: int = field(default=200, metadata={"help": "Procedural images scanned to pick that pool."})
    num_episodes: int = 192
    episode_batch_sizes: list[int] = field(default_factory=lambda: [8, 1, 32])
    solver_batch_size: int = field(default=8, metadata={"help": "Episode batch of the exact vs autograd runs."})
    adaptation_steps: int = 100
    fail_parts: list[str] = field(default_factory=list, metadata={"help": "Testing: raise inside these parts."})


def dry_run_profile(args: SuiteArguments) -> SuiteArguments:
    """The tiny CPU sizes of `--dry_run` (output_dir, budget_s, parts and fail_parts are kept)."""
    return SuiteArguments(
        output_dir=args.output_dir,
        dry_run=True,
        budget_s=args.budget_s,
        device=args.device or "cpu",
        parts=args.parts,
        backbone="resnet18",
        image_size=64,
        hidden_size=32,
        forward_batch_sizes=[1, 2],
        forward_warmup=1,
        forward_iters=2,
        pretrain_batch_size=2,
        pretrain_warmup=1,
        pretrain_steps=1,
        pascal_train_images=args.pascal_train_images,
        coco_train_images=args.coco_train_images,
        num_images=4,
        scan_images=60,
        num_episodes=8,
        episode_batch_sizes=[4, 1],
        solver_batch_size=4,
        adaptation_steps=10,
        fail_parts=args.fail_parts,
    )


# -- helpers ----------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget counted from `start` (default: this module's import)."""

    def __init__(self, seconds: float, start: float = _STARTED):
        self.seconds, self.start = float(seconds), start

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float) -> bool:
        return self.left() > estimate_s


class _Skip(Exception):
    """A measurement that the budget does not allow."""


def _log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():7.1f} s] {message}", flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    """Peak memory since `_reset_peak`: `torch.cuda.max_memory_allocated` on CUDA; on CPU the process's peak RSS
    (cumulative over the run, not per measurement: only there for the dry run)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, device: torch.device, warmup: int, iters: int, budget: Budget, what: str) -> list[float]:
    """Seconds of `iters` calls of `fn` after `warmup` untimed ones, synchronised around each call. Raises `_Skip`
    when the last warm-up call says the timed calls would overrun the budget."""
    if not budget.allows(0.0):
        raise _Skip(f"{what}: budget spent")
    last = 0.0
    for _ in range(max(1, warmup)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - start
    if not budget.allows(last * iters):
        raise _Skip(f"{what}: {iters} x {last:.2f} s would not fit in the {budget.left():.0f} s left")
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _environment(args: SuiteArguments, device: torch.device) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    import timm
    import transformers

    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "peak_memory": "torch.cuda.max_memory_allocated per measurement"
        if device.type == "cuda"
        else "process peak RSS (CPU; cumulative over the run)",
    }
    if device.type == "cuda":
        env["device_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return env


def _check_injected(args: SuiteArguments, part: str) -> None:
    if part in args.fail_parts:
        raise RuntimeError(f"injected failure in part {part!r} (--fail_parts)")


def _model_config(args: SuiteArguments, base_class_names, **kwargs) -> GFSSConfig:
    return GFSSConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        hidden_size=args.hidden_size,
        base_class_names=tuple(base_class_names),
        **kwargs,
    )


# -- part 1: forward ----------------------------------------------------------------------------------------------
def part_forward(args: SuiteArguments, device: torch.device, budget: Budget, results: dict) -> None:
    """Inference forward (logits upsampled to the input) at each batch size, fp32 / bf16 x contiguous /
    channels-last."""
    _check_injected(args, "forward")
    config = _model_config(args, [f"class{i}" for i in range(15)], use_projection=False)
    torch.manual_seed(0)
    model = GFSSModel(config).to(device)
    size = args.image_size
    generator = torch.Generator().manual_seed(0)
    # Measured BatchNorm statistics keep the random network's activations in range (fp32 overflow or denormals in
    # the deep layers would time something else).
    recalibrate_batchnorm(model, torch.randn(4, 3, size, size, generator=generator).to(device))
    results["model"] = f"{args.backbone} OS{config.output_stride} + PPM, {size} px, {config.num_labels} classes"
    results["measurements"] = []
    for batch_size in args.forward_batch_sizes:
        pixels = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
        for bf16 in (False, True):
            for channels_last in (False, True):
                name = f"batch {batch_size}, {'bf16' if bf16 else 'fp32'}{', channels-last' if channels_last else ''}"
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                model.to(memory_format=fmt)
                x = pixels.contiguous(memory_format=fmt)

                def forward(x=x, bf16=bf16):
                    with torch.inference_mode(), _autocast(device, bf16):
                        model(pixel_values=x)

                entry = {
                    "batch_size": batch_size,
                    "precision": "bf16" if bf16 else "fp32",
                    "channels_last": channels_last,
                }
                results["measurements"].append(entry)
                _reset_peak(device)
                try:
                    times = _timed(forward, device, args.forward_warmup, args.forward_iters, budget, name)
                except _Skip as skip:
                    entry.update(status="skipped", reason=str(skip))
                    _log(budget, f"forward {name}: skipped ({skip})")
                    continue
                median = statistics.median(times)
                entry.update(
                    status="ok",
                    iters=len(times),
                    s_per_batch=median,
                    s_per_batch_min=min(times),
                    images_per_s=batch_size / median,
                    peak_mib=_peak_mib(device),
                )
                _log(budget, f"forward {name}: {entry['images_per_s']:.1f} images/s, peak {entry['peak_mib']:.0f} MiB")
    model.to(memory_format=torch.contiguous_format)


# -- part 2: pre-training step -----------------------------------------------------------------------------------
def part_pretrain(args: SuiteArguments, device: torch.device, budget: Budget, results: dict) -> None:
    """Training steps (forward, smoothed CE [+ 0.1 x contrastive], backward, SGD) at the paper's recipe."""
    _check_injected(args, "pretrain")
    recipe = SimpleNamespace(
        backbone=args.backbone,
        image_size=args.image_size,
        hidden_size=args.hidden_size,
        projection_dim=256,
        batch_size=args.pretrain_batch_size,
        max_samples=1024,
        max_views=100,
    )
    model, pixels, labels = build_pretraining_batch(recipe)  # the batch of bench/pretrain_step.py
    model.to(device).train()
    pixels, labels = pixels.to(device), labels.to(device)
    batch = args.pretrain_batch_size
    # gfss_hf.training drops the last incomplete batch: floor(images / batch) optimizer steps per epoch.
    pascal_steps = 100 * (args.pascal_train_images // batch)
    coco_steps = 20 * (args.coco_train_images // batch)
    results["recipe"] = {
        "image_size": args.image_size,
        "batch_size": batch,
        "optimizer": "SGD",
        "lr": 2.5e-3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "label_smoothing": model.config.label_smoothing,
        "contrastive_weight": 0.1,
        "max_samples": recipe.max_samples,
        "max_views": recipe.max_views,
        "data": "random images, blocky labels "
        "(bench/pretrain_step.py); data loading, validation and checkpoints not included",
    }
    results["projection_basis"] = {
        "pascal_images": args.pascal_train_images,
        "pascal_epochs": 100,
        "pascal_steps": pascal_steps,
        "pascal_source": "PASCAL-5i fold base-train images as issue #19 states them (the shipped train list has "
        "5,953 images before the base-class filter)",
        "coco_images": args.coco_train_images,
        "coco_epochs": 20,
        "coco_steps": coco_steps,
        "coco_source": "all 82,783 COCO 2014 train images (the official train2014 count); a fold's base-train "
        "filter (a base class with >= 2,048 px) drops some, so this is an upper bound; the repository holds no "
        "filtered count",
    }
    results["measurements"] = []
    for bf16 in (False, True):
        for with_ctr in (False, True):
            name = f"{'bf16' if bf16 else 'fp32'}, {'CE + 0.1 x contrastive' if with_ctr else 'CE'}"
            optimizer = torch.optim.SGD(model.parameters(), lr=2.5e-3, momentum=0.9, weight_decay=1e-4)
            generator = torch.Generator().manual_seed(0)

            def step(bf16=bf16, with_ctr=with_ctr, optimizer=optimizer, generator=generator):
                with _autocast(device, bf16):
                    outputs = model(pixel_values=pixels, labels=labels, output_embeddings=with_ctr)
                    loss = outputs.loss
                    if with_ctr:
                        loss = loss + 0.1 * contrastive_term(model, outputs, labels, recipe, generator)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            entry = {"precision": "bf16" if bf16 else "fp32", "contrastive": with_ctr}
            results["measurements"].append(entry)
            _reset_peak(device)
            try:
                times = _timed(step, device, args.pretrain_warmup, args.pretrain_steps, budget, name)
            except _Skip as skip:
                entry.update(status="skipped", reason=str(skip))
                _log(budget, f"pretrain {name}: skipped ({skip})")
                continue
            median = statistics.median(times)
            entry.update(
                status="ok",
                steps=len(times),
                s_per_step=median,
                s_per_step_min=min(times),
                images_per_s=batch / median,
                peak_mib=_peak_mib(device),
                pascal_100_epochs_h=pascal_steps * median / 3600,
                coco_20_epochs_h=coco_steps * median / 3600,
            )
            _log(
                budget,
                f"pretrain {name}: {median:.3f} s/step, {entry['images_per_s']:.1f} images/s, peak "
                f"{entry['peak_mib']:.0f} MiB",
            )
    ok = {(m["precision"], m["contrastive"]): m for m in results["measurements"] if m["status"] == "ok"}
    for precision in ("fp32", "bf16"):
        if (precision, False) in ok and (precision, True) in ok:
            ce, ctr = ok[(precision, False)]["s_per_step"], ok[(precision, True)]["s_per_step"]
            results[f"contrastive_overhead_{precision}"] = ctr / ce - 1.0


# -- part 3: the paper protocol ----------------------------------------------------------------------------------
def _protocol_runs(args: SuiteArguments) -> list[tuple[str, str, int]]:
    """(solver, loss resolution, episode batch) in the order they run: the exact vs autograd pairs first (what the
    budget must not cut), then the other batch sizes of the exact solver."""
    b = args.solver_batch_size
    runs = [(solver, res, b) for res in ("feature", "input") for solver in ("exact", "autograd")]
    runs += [("exact", res, size) for res in ("feature", "input") for size in args.episode_batch_sizes if size != b]
    return runs


def _compare(exact, autograd) -> dict:
    """Metric sums of the exact and the autograd solver on the same episodes."""
    identical = all(
        exact.accumulators[k].state_dict() == autograd.accumulators[k].state_dict() for k in exact.accumulators
    )
    changed = scored = 0
    for k, acc in exact.accumulators.items():
        a, b = acc.confusion.cpu().double(), autograd.accumulators[k].confusion.cpu().double()
        changed += float((a - b).abs().sum()) / 2
        scored += float(a.sum())
    return {
        "identical_sums": identical,
        # Each pixel whose prediction changed moves one count between two confusion cells: half the L1 distance is a
        # lower bound on the pixels predicted differently.
        "changed_pixels_fraction": changed / max(scored, 1.0),
        "max_metric_abs_diff": max(abs(exact.metrics[k] - autograd.metrics[k]) for k in exact.metrics),
    }


def part_protocol(args: SuiteArguments, device: torch.device, budget: Budget, results: dict) -> None:
    """`evaluate_episodes` on procedural images: episodes/s per solver, loss resolution and episode batch."""
    _check_injected(args, "protocol")
    split = get_split("synthetic", 0)
    config = _model_config(args, split.base_names, use_projection=False, dataset="synthetic", fold=0)
    torch.manual_seed(0)
    model = GFSSModel(config).to(device).eval()
    processor = GFSSImageProcessor.from_config(config)
    data, ids = image_pool(split, args.image_size, args.num_images, args.scan_images)  # bench/evaluation.py's pool
    source = PoolSource(data, ids)
    pixels = torch.cat([processor(source.get_by_id(i)["image"], return_tensors="pt")["pixel_values"] for i in ids])
    recalibrate_batchnorm(model, pixels.to(device))  # on every pool image, see bench/_calibration.py
    episodes = build_episodes(
        "paper",
        split,
        source,
        shots=1,
        num_episodes=args.num_episodes,
        seed=42,
        min_pixels=min_pixels(args.image_size),
    )
    distinct = len({i for e in episodes for i in [e.query_id, *e.all_support_ids(), e.base_query_id] if i})
    _log(budget, f"protocol: {len(episodes)} episodes over {distinct} distinct images of {len(ids)}")

    # Features of one image (preprocessing + forward, as the cache computes them), to split a run's time into
    # features and adaptation. A throwaway cache warms the model up first.
    FeatureCache(model, processor, {"val": source}).features("val", ids[:2])
    cache = FeatureCache(model, processor, {"val": source})
    _sync(device)
    start = time.perf_counter()
    for image_id in ids:
        cache.features("val", [image_id])
    _sync(device)
    feature_s = (time.perf_counter() - start) / len(ids)
    del cache
    results.update(
        num_episodes=len(episodes),
        distinct_images=distinct,
        pool_images=len(ids),
        feature_s_per_image=feature_s,
        adaptation_steps=args.adaptation_steps,
        shots=1,
        projection_basis=f"{PASCAL_VAL_IMAGES} x feature_s_per_image + {FOLD_EPISODES} x "
        "adaptation_s_per_episode (PASCAL-5i val, one fold)",
    )
    _log(budget, f"protocol: features {feature_s * 1000:.1f} ms per image")

    def evaluate(solver: str, resolution: str, batch_size: int, subset):
        options = EvaluationOptions(
            adaptation=AdaptationConfig(steps=args.adaptation_steps, loss_resolution=resolution, solver=solver),
            episode_batch_size=batch_size,
            progress=False,
        )
        _sync(device)
        start = time.perf_counter()
        result = evaluate_episodes(model, subset, split=split, val_source=source, processor=processor, options=options)
        _sync(device)
        return result, time.perf_counter() - start

    results["runs"] = []
    finished = {}
    for solver, resolution, batch_size in _protocol_runs(args):
        name = f"{solver} solver, {resolution}-resolution loss, episode batch {batch_size}"
        entry = {"solver": solver, "loss_resolution": resolution, "episode_batch_size": batch_size}
        results["runs"].append(entry)
        # Warm-up on one batch of episodes (kernels, allocator); its time, with the features of the images it
        # needs taken out, predicts the run's length. The warm-up itself costs those features and one batch of
        # adaptation, for which the slowest adaptation measured so far stands in (with a margin).
        warm = episodes[:batch_size]
        warm_images = len({i for e in warm for i in [e.query_id, *e.all_support_ids(), e.base_query_id] if i})
        slowest = max((r["adaptation_s_per_episode"] for r in results["runs"] if r.get("status") == "ok"), default=0)
        warm_estimate = warm_images * feature_s + 2.0 * len(warm) * slowest
        if not budget.allows(warm_estimate):
            entry.update(
                status="skipped",
                reason=f"its warm-up alone (~{warm_estimate:.0f} s) would not fit in the {budget.left():.0f} s left",
            )
            _log(budget, f"protocol {name}: skipped ({entry['reason']})")
            continue
        _, warm_s = evaluate(solver, resolution, batch_size, warm)
        adaptation_estimate = max(warm_s - warm_images * feature_s, 0.0) * len(episodes) / len(warm)
        estimate = distinct * feature_s + 1.25 * adaptation_estimate  # one batch predicts the others roughly
        if not budget.allows(estimate):
            entry.update(status="skipped", reason=f"estimated {estimate:.0f} s, {budget.left():.0f} s left")
            _log(budget, f"protocol {name}: skipped ({entry['reason']})")
            continue
        _reset_peak(device)
        result, seconds = evaluate(solver, resolution, batch_size, episodes)
        adaptation = max(seconds - distinct * feature_s, 0.0) / len(episodes)
        entry.update(
            status="ok",
            seconds=seconds,
            episodes_per_s=len(episodes) / seconds,
            adaptation_s_per_episode=adaptation,
            peak_mib=_peak_mib(device),
            projected_fold_minutes=(PASCAL_VAL_IMAGES * feature_s + FOLD_EPISODES * adaptation) / 60,
            metrics=result.metrics,
        )
        finished[(solver, resolution, batch_size)] = result
        _log(
            budget,
            f"protocol {name}: {entry['episodes_per_s']:.2f} episodes/s, {adaptation * 1000:.1f} ms "
            f"adaptation per episode, fold ~{entry['projected_fold_minutes']:.1f} min",
        )
    results["exact_vs_autograd"] = {}
    for resolution in ("feature", "input"):
        key = (resolution, args.solver_batch_size)
        if ("exact", *key) in finished and ("autograd", *key) in finished:
            comparison = _compare(finished[("exact", *key)], finished[("autograd", *key)])
            results["exact_vs_autograd"][resolution] = comparison
            _log(
                budget,
                f"protocol {resolution}: exact vs autograd identical sums {comparison['identical_sums']}, "
                f"changed pixels >= {100 * comparison['changed_pixels_fraction']:.4f} %",
            )


PART_FUNCTIONS = {"forward": part_forward, "pretrain": part_pretrain, "protocol": part_protocol}


# -- report -------------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def report_markdown(report: dict) -> str:
    """The Markdown section of a report, for bench/BENCHMARKS.md."""
    env = report["environment"]
    parts = report["parts"]
    title = "GPU suite" + (" (DRY RUN on CPU: tiny sizes, the numbers mean nothing)" if report["dry_run"] else "")
    lines = [
        f"## {title}: {env.get('device_name')}",
        "",
        f"Command: `{report['command']}` ({report['started_utc']}, {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s "
        f"budget). torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, cudnn.benchmark "
        f"{env.get('cudnn_benchmark')}, TF32 convolutions {env.get('cudnn_allow_tf32')}, TF32 matmul "
        f"{env.get('matmul_allow_tf32')}; peak memory: {env.get('peak_memory')}.",
        "",
    ]
    for name in PARTS:
        part = parts.get(name, {"status": "not requested"})
        if part["status"] not in ("ok",):
            lines += [f"- **{name}**: {part['status']}" + (f": {part['error']}" if part.get("error") else ""), ""]
        res = part.get("results") or {}
        if name == "forward" and res.get("measurements"):
            lines += [
                f"### Forward: {res['model']}",
                "",
                "| batch | precision | memory format | s / batch (median) | images / s | peak MiB |",
                "|---:|---|---|---:|---:|---:|",
            ]
            for m in res["measurements"]:
                fmt = "channels-last" if m["channels_last"] else "contiguous"
                if m["status"] == "ok":
                    lines.append(
                        f"| {m['batch_size']} | {m['precision']} | {fmt} | {m['s_per_batch']:.4f} | "
                        f"{_fmt(m['images_per_s'])} | {_fmt(m['peak_mib'], 0)} |"
                    )
                else:
                    lines.append(f"| {m['batch_size']} | {m['precision']} | {fmt} | {m['status']} | | |")
            lines.append("")
        if name == "pretrain" and res.get("measurements"):
            basis = res["projection_basis"]
            lines += [
                f"### Pre-training step: batch {res['recipe']['batch_size']}, {res['recipe']['image_size']} px, "
                "SGD (momentum 0.9, weight decay 1e-4, lr 2.5e-3)",
                "",
                f"| precision | loss | s / step (median) | images / s | peak MiB | 100 PASCAL epochs "
                f"({basis['pascal_images']:,} images), h | 20 COCO epochs ({basis['coco_images']:,} images), h |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for m in res["measurements"]:
                loss = "CE + 0.1 x contrastive" if m["contrastive"] else "CE"
                if m["status"] == "ok":
                    lines.append(
                        f"| {m['precision']} | {loss} | {m['s_per_step']:.3f} | {_fmt(m['images_per_s'])} | "
                        f"{_fmt(m['peak_mib'], 0)} | {_fmt(m['pascal_100_epochs_h'])} | "
                        f"{_fmt(m['coco_20_epochs_h'])} |"
                    )
                else:
                    lines.append(f"| {m['precision']} | {loss} | {m['status']} | | | | |")
            lines += [
                "",
                f"COCO: {basis['coco_source']}. Steps per epoch = images // batch (the last incomplete "
                "batch is dropped, as in gfss_hf.training); data loading is not included.",
                "",
            ]
        if name == "protocol" and res.get("runs"):
            lines += [
                f"### Paper protocol: {res['num_episodes']} episodes (1-shot, {res['adaptation_steps']} steps) "
                f"over {res['distinct_images']} procedural images, features {res['feature_s_per_image'] * 1000:.1f}"
                " ms per image",
                "",
                "| solver | loss resolution | episode batch | episodes / s | adaptation ms / episode | "
                "projected 20,000-episode fold (min) | peak MiB |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for r in res["runs"]:
                head = f"| {r['solver']} | {r['loss_resolution']} | {r['episode_batch_size']} |"
                if r["status"] == "ok":
                    lines.append(
                        f"{head} {r['episodes_per_s']:.2f} | {r['adaptation_s_per_episode'] * 1000:.1f} | "
                        f"{_fmt(r['projected_fold_minutes'])} | {_fmt(r['peak_mib'], 0)} |"
                    )
                else:
                    lines.append(f"{head} {r['status']} | | | |")
            lines.append("")
            for resolution, c in res.get("exact_vs_autograd", {}).items():
                lines.append(
                    f"- {resolution}-resolution loss, exact vs autograd: identical metric sums "
                    f"{c['identical_sums']}; pixels predicted differently >= "
                    f"{100 * c['changed_pixels_fraction']:.4f} %; largest metric difference "
                    f"{c['max_metric_abs_diff']:.2e}."
                )
            lines += [f"- Fold projection: {res['projection_basis']}.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(output_dir: str | os.PathLike, report: dict) -> None:
    """Write gpu_suite.json and gpu_suite.md into `output_dir`, each atomically (temporary file + rename): a reader,
    or a run killed mid-write, never sees a half-written report."""
    output_dir = Path(output_dir)
    text = json.dumps(report, indent=2, default=str)
    markdown = report_markdown(report)
    for name, content in ((REPORT_MD, markdown), (REPORT_JSON, text)):
        atomic_write_text(output_dir / name, content)  # the mode of a plain write, as the umask allows


# -- driver -------------------------------------------------------------------------------------------------------
def run_suite(args: SuiteArguments, command: str, budget: Budget | None = None) -> dict:
    """Run the requested parts under the budget; returns the report (also written after every part)."""
    if args.dry_run:
        args = dry_run_profile(args)
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; the parts are {list(PARTS)}.")
    budget = budget or Budget(args.budget_s)
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here; run with --dry_run (CPU) or on a machine with a GPU.")
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    report = {
        "suite": "gfss_hf GPU suite (bench/gpu_suite.py)",
        "dry_run": args.dry_run,
        "command": command,
        "arguments": asdict(args),
        "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "budget_s": args.budget_s,
        "wall_s": budget.elapsed(),
        "environment": _environment(args, device),
        "parts": {},
        "ok": True,
    }
    _log(
        budget,
        f"GPU suite on {report['environment']['device_name']} ({device}), budget {args.budget_s:.0f} s"
        f"{', DRY RUN' if args.dry_run else ''}",
    )
    for name in PARTS:
        if name not in args.parts:
            continue
        part = report["parts"][name] = {"status": "running", "results": {}}
        if not budget.allows(0.0):
            part.update(status="skipped", reason=f"budget of {args.budget_s:.0f} s spent")
            _log(budget, f"{name}: skipped (budget spent)")
            continue
        _log(budget, f"{name}: start")
        start = time.perf_counter()
        try:
            PART_FUNCTIONS[name](args, device, budget, part["results"])
            part["status"] = "ok"
        except Exception as error:  # noqa: BLE001  (a part's failure is recorded; the others still run)
            part.update(
                status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:]
            )
            report["ok"] = False
            _log(budget, f"{name}: FAILED: {part['error']}")
        finally:
            part["seconds"] = time.perf_counter() - start
            if device.type == "cuda":
                torch.cuda.empty_cache()
        _log(budget, f"{name}: {part['status']} in {part['seconds']:.1f} s")
        report["wall_s"] = budget.elapsed()
        write_report(args.output_dir, report)
    report["wall_s"] = budget.elapsed()
    write_report(args.output_dir, report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(SuiteArguments, description=__doc__.splitlines()[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if not args.dry_run and (args.device or "cuda").startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_suite: no CUDA device here; run with --dry_run (CPU, tiny sizes) or on a machine with a GPU.",
            file=sys.stderr,
        )
        return 2
    report = run_suite(args, command="python bench/gpu_suite.py " + " ".join(argv))
    out = Path(args.output_dir)
    _log(
        Budget(args.budget_s), f"report: {out / REPORT_JSON}, {out / REPORT_MD} ({'ok' if report['ok'] else 'FAILED'})"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
