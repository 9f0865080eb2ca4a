"""CPU cost per image of a GFSSModel forward pass (batch 1, eval mode) for several backbones, random weights.

These are plumbing numbers: they say what a backbone costs, not how good its features are (random initialisation).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/backbones.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from gfss_hf import GFSSConfig, GFSSModel

__all__ = ["BACKBONES", "main", "time_forward"]

# name -> (GFSSConfig fields, the two image sizes). A ViT's sizes are multiples of its patch (14): 98 / 238 beside
# the CNNs' 96 / 240. The first row is the model of scripts/configs/synthetic.yaml.
BACKBONES = {
    "resnet18-quarter": (
        {"backbone": "resnet18", "backbone_kwargs": {"channels": [16, 32, 64, 128]}, "hidden_size": 128},
        (96, 240),
    ),
    "resnet50s": ({"backbone": "resnet50s"}, (96, 240)),
    "convnext_atto": ({"backbone": "convnext_atto"}, (96, 240)),
    "vit_small_patch14_dinov2": ({"backbone": "vit_small_patch14_dinov2", "output_stride": None}, (98, 238)),
}


@torch.no_grad()
def time_forward(model: GFSSModel, size: int, repeats: int) -> float:
    """Best of `repeats` timed forward passes of one `size x size` image, after one warm-up pass (seconds)."""
    pixels = torch.randn(1, 3, size, size)
    model(pixels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(pixels)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None, help="a subset of: " + ", ".join(BACKBONES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)")
    print("| backbone | stride | backbone params (M) | small: ms / image | large: ms / image |")
    print("|---|---:|---:|---:|---:|")
    for name, (fields, sizes) in BACKBONES.items():
        if args.only and name not in args.only:
            continue
        cells = []
        for size in sizes:
            torch.manual_seed(0)
            model = GFSSModel(GFSSConfig(**fields, image_size=size, use_projection=False)).eval()
            cells.append(f"{1000 * time_forward(model, size, args.repeats):.0f} ({size} px)")
        params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        print(f"| {name} | {model.feature_stride} | {params:.1f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
