"""Seconds per pre-training step and peak memory, with and without the contrastive term, on one model and batch.

A step is forward + smoothed CE (+ lambda x pixel contrastive: feature-size predictions, sampling, InfoNCE) +
backward + SGD step, in training mode. Each variant runs in its own subprocess so that its peak memory (peak RSS on
CPU, `torch.cuda.max_memory_allocated` on GPU) is its own; timings alternate the two variants in one process
(CE step, CE + contrastive step, ...) so that the load of a shared machine hits both alike. The contrastive term
alone (sampling + InfoNCE + backward to the embeddings) is also timed in isolation on the step's embeddings.

    python bench/pretrain_step.py --backbone resnet50s --image_size 473 --batch_size 2 --steps 5
    python bench/pretrain_step.py --backbone test_resnet --image_size 96 --batch_size 8   # quick check
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(args):
    from gfss_hf import GFSSConfig, GFSSModel

    config = GFSSConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        hidden_size=args.hidden_size,
        projection_dim=args.projection_dim,
        base_class_names=tuple(f"class{i}" for i in range(15)),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GFSSModel(config).train()
    g = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    # Blocky labels (8x8 grid of classes 0..15 with an ignored border): every image has many large classes, as in
    # PASCAL, so the sampler has plenty of (image, class) pairs.
    cells = torch.randint(0, 16, (args.batch_size, 8, 8), generator=g)
    labels = torch.nn.functional.interpolate(cells[:, None].float(), size=(args.image_size,) * 2, mode="nearest")
    labels = labels[:, 0].long()
    labels[:, -args.image_size // 10 :, :] = 255
    return model, pixel_values, labels


def contrastive_term(model, outputs, labels, args, generator):
    from gfss_hf.losses import contrastive_loss_from_samples, sample_contrastive_pixels

    with torch.no_grad():
        predictions = model.classifier(outputs.features).argmax(1)
    x, y = sample_contrastive_pixels(
        outputs.embeddings,
        labels,
        predictions,
        max_samples=args.max_samples,
        max_views=args.max_views,
        generator=generator,
    )
    return contrastive_loss_from_samples(x, y, temperature=0.1)


def make_step(model, pixel_values, labels, optimizer, args, generator, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(use_ctr: bool) -> tuple[float, float]:
        """One training step; returns (seconds, seconds of the contrastive term alone or 0)."""
        sync()
        start = time.perf_counter()
        outputs = model(pixel_values=pixel_values, labels=labels, output_embeddings=use_ctr)
        loss = outputs.loss
        if use_ctr:
            loss = loss + 0.1 * contrastive_term(model, outputs, labels, args, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        term = 0.0
        if use_ctr:
            # The term alone on the embeddings of this batch: sampling + InfoNCE + backward to the embeddings.
            with torch.no_grad():
                feats = model.extract_features(pixel_values)
                emb = torch.nn.functional.normalize(model.projection(feats), dim=1)
            emb.requires_grad_(True)
            fake = type("Outputs", (), {"features": feats, "embeddings": emb})
            sync()
            t0 = time.perf_counter()
            contrastive_term(model, fake, labels, args, generator).backward()
            sync()
            term = time.perf_counter() - t0
        return elapsed, term

    return step


def setup(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, pixel_values, labels = build(args)
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    return make_step(
        model, pixel_values.to(device), labels.to(device), optimizer, args, torch.Generator().manual_seed(0), device
    ), device


def peak_memory(args) -> dict:
    """Run only `args.variant` (in a fresh process) and report its peak memory."""
    step, device = setup(args)
    step(args.variant == "contrastive")  # the peak is reached within the first step
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"variant": args.variant, "peak_mib": peak}


def timings(args) -> dict:
    """Alternate CE and CE + contrastive steps on the same model and batch, so that load changes of a shared
    machine hit both variants alike; medians over `args.steps` steps each after `args.warmup` of each."""
    step, _ = setup(args)
    ce, ctr, term = [], [], []
    for i in range(args.warmup + args.steps):
        a = step(False)
        b = step(True)
        print(
            f"step {i}: CE {a[0]:.3f} s, CE + contrastive {b[0]:.3f} s (term alone {b[1]:.3f} s)",
            file=sys.stderr,
            flush=True,
        )
        if i >= args.warmup:
            ce.append(a[0])
            ctr.append(b[0])
            term.append(b[1])
    return {"ce": ce, "contrastive": ctr, "term": term}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet50s")
    parser.add_argument("--image_size", type=int, default=473)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--projection_dim", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=2, help="At least 2: the 1x1 pyramid bin has BatchNorm.")
    parser.add_argument("--max_samples", type=int, default=1024)
    parser.add_argument("--max_views", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variant", choices=("ce", "contrastive"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)
    if args.variant is not None:
        print(json.dumps(peak_memory(args)))
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    memory = {}
    for variant in ("ce", "contrastive"):
        out = subprocess.run([sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the {variant} memory run failed:\n{out.stderr[-3000:]}")
        memory[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
    runs = timings(args)
    ce = {"step_s_median": statistics.median(runs["ce"]), "peak_mib": memory["ce"]}
    ctr = {
        "step_s_median": statistics.median(runs["contrastive"]),
        "peak_mib": memory["contrastive"],
        "term_s_median": statistics.median(runs["term"]),
    }
    overhead = ctr["step_s_median"] / ce["step_s_median"] - 1.0
    summary = {
        "command": "python bench/pretrain_step.py " + " ".join(argv),
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s), device {args.device}, "
        f"torch {torch.__version__}",
        "ce_step_s": ce["step_s_median"],
        "contrastive_step_s": ctr["step_s_median"],
        "step_overhead": overhead,
        "contrastive_term_alone_s": ctr["term_s_median"],
        "term_share_of_step": ctr["term_s_median"] / ctr["step_s_median"],
        "ce_peak_mib": ce["peak_mib"],
        "contrastive_peak_mib": ctr["peak_mib"],
        "runs": runs,
    }
    print(f"{'variant':<14}{'s/step (median)':>16}{'peak MiB':>10}")
    print(f"{'CE':<14}{ce['step_s_median']:>16.3f}{ce['peak_mib']:>10.0f}")
    print(f"{'CE + ctr':<14}{ctr['step_s_median']:>16.3f}{ctr['peak_mib']:>10.0f}")
    print(
        f"step overhead {overhead * 100:+.1f}%; contrastive term alone {ctr['term_s_median']:.3f} s "
        f"({summary['term_share_of_step'] * 100:.1f}% of a step)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
