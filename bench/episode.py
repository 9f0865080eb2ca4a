"""Time of one 1-shot GFSS episode, split into feature extraction and classifier adaptation.

The model is the paper's PSPNet (ResNet-50 deep stem, output stride 8) with random weights (timing only), B = 15
base classes, a 473x473 canvas. An episode = features of the support and the query (one forward each) + 100 SGD
steps of the (B+2)-way classifier + the query prediction. Adaptation is timed with the exact loss (logits upsampled
to 473x473) and with the feature-resolution loss; `--naive` also times the library's plain autograd reference
(`AdaptationConfig(solver="autograd")`: losses.py on upsampled logits) for comparison.

The random-weight model gets BatchNorm statistics measured on the two images (`bench/_calibration.py`): with the
default statistics its features have a per-pixel L2 norm of ~4,700, fine-tuning at lr 0.1 diverges and every logit
saturates, a regime no trained model is in (and one where the engine redoes pixels on its exact, slower path).
`--raw-batchnorm` times that regime anyway. The printed loss before the first and the last step shows the regime.

Usage:

    OMP_NUM_THREADS=1 python bench/episode.py --threads 1 [--naive] [--repeats 3] [--raw-batchnorm]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from _calibration import recalibrate_batchnorm  # bench/, on the path when run as a script

from gfss_hf import GFSSConfig, GFSSModel
from gfss_hf.adaptation import AdaptationConfig, adapt_gfss, predict


def _timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=473)
    parser.add_argument("--base-classes", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--naive", action="store_true")
    parser.add_argument("--raw-batchnorm", action="store_true", help="keep the default BatchNorm statistics")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = GFSSConfig(
        base_class_names=tuple(f"base{i}" for i in range(args.base_classes)),
        image_size=args.image_size,
        use_projection=False,
    )
    torch.manual_seed(0)
    model = GFSSModel(config).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, args.image_size, args.image_size, generator=generator)  # support, query
    if not args.raw_batchnorm:
        recalibrate_batchnorm(model, images)
    labels = torch.zeros(1, args.image_size, args.image_size, dtype=torch.long)
    s = args.image_size
    labels[0, s // 4 : s // 2, s // 5 : s // 2] = 1  # a foreground object

    with torch.no_grad():
        model.extract_features(images[:1])  # warm-up
        extract_s, feats = _timed(lambda: torch.cat([model.extract_features(x[None]) for x in images]), args.repeats)
    base_weight = model.classifier.weight.detach().flatten(1)
    support, query = feats[:1], feats[1:]

    results = {}
    for resolution in ("input", "feature"):
        cfg = AdaptationConfig(steps=args.steps, loss_resolution=resolution)

        def episode(cfg=cfg):
            clf = adapt_gfss(support, labels, base_weight, support_classes=[0], config=cfg)
            return clf, predict(query, clf, size=(s, s)).argmax(1)

        results[resolution], (clf, _) = _timed(episode, args.repeats)
        history = clf.loss_history
        print(
            f"{resolution}-resolution loss: {float(history[0]):.4f} before the first step, "
            f"{float(history[-1]):.4f} before the last"
        )
    if args.naive:
        naive = AdaptationConfig(steps=args.steps, solver="autograd")
        results["naive autograd (input)"], _ = _timed(
            lambda: adapt_gfss(support, labels, base_weight, support_classes=[0], config=naive), 1
        )

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {args.threads}, "
        f"BatchNorm statistics {'default' if args.raw_batchnorm else 'measured'}, "
        f"mean feature norm {float(feats.norm(dim=1).mean()):.1f}"
    )
    print(f"feature extraction (support + query, {s}x{s}, resnet50s OS8 + PPM): {extract_s:.2f} s")
    for name, seconds in results.items():
        share = seconds / (seconds + extract_s)
        print(
            f"adaptation ({name}, {args.steps} steps, {args.base_classes + 2}-way) + prediction: {seconds:.2f} s "
            f"= {100 * share:.1f} % of the episode"
        )


if __name__ == "__main__":
    main()
