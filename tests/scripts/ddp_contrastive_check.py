"""Run under `accelerate launch --multi_gpu --num_processes 2`: checks that the distributed contrastive loss gives,
after DDP's gradient averaging, the gradient of the single-process loss on the whole global batch.

Writes a JSON report to the path given as the first argument (rank 0)."""

import copy
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from gfss_hf import GFSSConfig, GFSSModel
from gfss_hf.losses import contrastive_loss_from_samples, count_contrastive_pairs, sample_contrastive_pixels

GLOBAL_BATCH = 4
MAX_SAMPLES, MAX_VIEWS = 48, 3


def make_batch():
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=g)
    # 2x2-pixel blocks of random classes at the 8x8 feature size, upsampled to the input size.
    blocks = torch.randint(0, 4, (GLOBAL_BATCH, 4, 4), generator=g)
    labels = blocks.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)
    labels[:, :4, :] = 255
    return pixel_values, labels


def contrastive(model, pixel_values, labels, first_image, num_pairs, gather):
    out = model(pixel_values=pixel_values, output_embeddings=True)
    core = model.module if hasattr(model, "module") else model
    with torch.no_grad():
        predictions = core.classifier(out.features).argmax(1)
    generators = [torch.Generator().manual_seed(100 + first_image + i) for i in range(pixel_values.shape[0])]
    x, y = sample_contrastive_pixels(
        out.embeddings,
        labels,
        predictions,
        max_samples=MAX_SAMPLES,
        max_views=MAX_VIEWS,
        num_pairs=num_pairs,
        generator=generators,
    )
    return contrastive_loss_from_samples(x, y, temperature=0.1, gather=gather), x.shape[0]


def main(report_path):
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],  # the classifier is unused
    )
    world, rank = accelerator.num_processes, accelerator.process_index
    config = GFSSConfig(
        backbone="test_resnet", hidden_size=16, image_size=64, projection_dim=8, base_class_names=("a", "b", "c")
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GFSSModel(config)
    # Eval mode: BatchNorm uses running statistics and there is no dropout, so an image's forward pass does not
    # depend on which process or batch holds it.
    model.eval()
    reference = copy.deepcopy(model)
    pixel_values, labels = make_batch()
    num_pairs = count_contrastive_pairs(labels, (8, 8), max_views=MAX_VIEWS)

    ddp_model = accelerator.prepare(model)
    ddp_model.eval()
    per = GLOBAL_BATCH // world
    local = slice(rank * per, (rank + 1) * per)
    loss, local_samples = contrastive(
        ddp_model,
        pixel_values[local].to(accelerator.device),
        labels[local].to(accelerator.device),
        rank * per,
        num_pairs,
        gather=True,
    )
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()

    ref_loss, ref_samples = contrastive(reference, pixel_values, labels, 0, num_pairs, gather=False)
    ref_loss.backward()
    ddp_params = dict(accelerator.unwrap_model(ddp_model).named_parameters())
    max_diff, max_ref, compared = 0.0, 0.0, 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            continue
        q = ddp_params[name].grad
        max_diff = max(max_diff, (q.cpu() - p.grad).abs().max().item())
        max_ref = max(max_ref, p.grad.abs().max().item())
        compared += 1
    if accelerator.is_main_process:
        with open(report_path, "w") as fh:
            json.dump(
                {
                    "world_size": world,
                    "ddp_loss_mean": mean_loss,
                    "reference_loss": ref_loss.item(),
                    "max_grad_diff": max_diff,
                    "max_grad_abs": max_ref,
                    "params_compared": compared,
                    "local_samples": local_samples,
                    "reference_samples": ref_samples,
                },
                fh,
            )
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
