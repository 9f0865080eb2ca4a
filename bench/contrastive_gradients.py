"""How hard the pixel contrastive term pulls on the shared weights, next to the cross-entropy.

For a pre-trained synthetic-config model (or a freshly initialised one, `--init`), on a few training batches of the
embedded dataset: the norm of the gradient of the cross-entropy and of the contrastive loss (the training recipe's
sampling: `max_samples`, `max_views`, temperature of the YAML) with respect to the backbone + decoder parameters
(the weights both terms share), their ratio and their cosine. Multiply the ratio by lambda for the share of the
contrastive term in the update. The model's projection head is used when it has one, otherwise a fresh one.

    python bench/contrastive_gradients.py outputs/synthetic-fold0 [--init] [--batches 4]
"""

from __future__ import annotations

import argparse

import torch

from gfss_hf import GFSSConfig, GFSSModel
from gfss_hf.losses import pixel_contrastive_loss
from gfss_hf.training import build_pretraining_datasets
from gfss_hf.training_config import TrainingConfig

CONFIG = "scripts/configs/synthetic.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a folder written by scripts/pretrain.py (its config gives the architecture)")
    parser.add_argument("--init", action="store_true", help="a freshly initialised model of that architecture")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--config", default=CONFIG, help="training YAML: data, batch size and contrastive sampling")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = GFSSConfig.from_pretrained(args.model)
    config.use_projection = True
    model = GFSSModel(config) if args.init else GFSSModel.from_pretrained(args.model, config=config)
    model.train()
    training = TrainingConfig.from_yaml(args.config)
    train = build_pretraining_datasets(training)[0]
    shared = [p for n, p in model.named_parameters() if not n.startswith(("projection", "classifier"))]
    size = training.batch_size
    print("batch | |grad CE| | |grad contrastive| | ratio | cosine | contrastive loss")
    for b in range(args.batches):
        items = [train[b * size + i] for i in range(size)]
        pixels = torch.stack([torch.as_tensor(it["pixel_values"]) for it in items])
        labels = torch.stack([torch.as_tensor(it["labels"]) for it in items])
        out = model(pixel_values=pixels, labels=labels, output_embeddings=True)
        grad_ce = torch.autograd.grad(out.loss, shared, retain_graph=True, allow_unused=True)
        with torch.no_grad():
            predictions = model.classifier(out.features).argmax(1)
        contrastive = pixel_contrastive_loss(
            out.embeddings,
            labels,
            predictions,
            temperature=training.temperature,
            max_samples=training.max_samples,
            max_views=training.max_views,
            generator=torch.Generator().manual_seed(b),
        )
        grad_ct = torch.autograd.grad(contrastive, shared, allow_unused=True)
        pairs = [(a, c) for a, c in zip(grad_ce, grad_ct) if a is not None and c is not None]
        norm_ce = torch.sqrt(sum((a**2).sum() for a, _ in pairs))
        norm_ct = torch.sqrt(sum((c**2).sum() for _, c in pairs))
        cosine = sum((a * c).sum() for a, c in pairs) / (norm_ce * norm_ct)
        print(
            f"{b} | {norm_ce:.4f} | {norm_ct:.4f} | {norm_ct / norm_ce:.1f} | {cosine:.3f} | {contrastive.item():.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
