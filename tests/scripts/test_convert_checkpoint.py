"""scripts/convert_checkpoint.py end to end: a DIaM-style file (DataParallel keys in a training container, legacy
serialisation) -> a save_pretrained folder that the Auto classes load, with the source's geometry and licence."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoImageProcessor, AutoModel

import gfss_hf  # noqa: F401  (registers the Auto classes)
from gfss_hf import GFSSImageProcessor, GFSSModel
from gfss_hf.conversion import convert_state_dict
from gfss_hf.data.splits import get_split

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "convert_checkpoint.py"
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def load_script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repri_state_dict(rows, seed=0):
    """RePRI / DIaM key names and ResNet-50 shapes (CHECKPOINTS.md 4.C), random values."""
    g = torch.Generator().manual_seed(seed)
    shapes = {}

    def bn(prefix, c):
        for p in BN:
            shapes[f"{prefix}.{p}"] = () if p == "num_batches_tracked" else (c,)

    for idx, (cout, cin) in zip((0, 3, 6), ((64, 3), (64, 64), (128, 64))):
        shapes[f"layer0.{idx}.weight"] = (cout, cin, 3, 3)
        bn(f"layer0.{idx + 1}", cout)
    for layer, (blocks, width, in0) in {
        1: (3, 64, 128),
        2: (4, 128, 256),
        3: (6, 256, 512),
        4: (3, 512, 1024),
    }.items():
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, in0 if b == 0 else 4 * width, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            for name, c in (("bn1", width), ("bn2", width), ("bn3", 4 * width)):
                bn(f"{p}.{name}", c)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, in0, 1, 1)
                bn(f"{p}.downsample.1", 4 * width)
    for i in range(4):
        shapes[f"ppm.features.{i}.1.weight"] = (512, 2048, 1, 1)
        bn(f"ppm.features.{i}.2", 512)
    shapes["bottleneck.0.weight"] = (512, 4096, 3, 3)
    bn("bottleneck.1", 512)
    shapes["classifier.weight"], shapes["classifier.bias"] = (rows, 512, 1, 1), (rows,)
    assert len(shapes) == 362  # the spec's count
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = 1 if len(shape) < 2 else shape[1] * shape[2] * shape[3]
            out[key] = torch.randn(shape, generator=g) / fan_in**0.5  # variance-preserving: finite logits
    return out


@pytest.mark.slow
def test_script_converts_a_diam_file_end_to_end(tmp_path):
    state = repri_state_dict(rows=61)
    checkpoint = tmp_path / "model.pth"
    # DIaM saves {'state_dict': ...} from a DDP model; POP-style legacy serialisation must load too.
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 20},
        checkpoint,
        _use_new_zipfile_serialization=False,
    )
    out = tmp_path / "converted"
    script = load_script()
    code = script.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--dataset",
            "coco20i",
            "--fold",
            "2",
            "--source",
            "diam",
            "--output_dir",
            str(out),
        ]
    )
    assert code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the temp folder was renamed

    model = AutoModel.from_pretrained(out).eval()
    assert isinstance(model, GFSSModel)
    config = model.config
    split = get_split("coco20i", 2)
    assert config.class_names == ["background", *split.base_names]
    assert (config.dilation_style, config.classifier_bias, config.use_projection) == ("pspnet", True, False)
    assert (config.image_size, config.pad_mode, config.dataset, config.fold) == (417, "zero", "coco20i", 2)
    assert "sinahmr/DIaM" in config.source_checkpoint and "model.pth" in config.source_checkpoint
    loaded = model.state_dict()
    assert torch.equal(loaded["backbone.bn1.running_var"], state["layer0.7.running_var"])
    assert torch.equal(loaded["decoder.stages.3.1.weight"], state["ppm.features.3.1.weight"])
    assert torch.equal(loaded["classifier.bias"], state["classifier.bias"])

    processor = AutoImageProcessor.from_pretrained(out)
    assert isinstance(processor, GFSSImageProcessor)
    assert (processor.image_size, processor.pad_mode) == (417, "zero")

    # The saved folder computes what the in-memory conversion computes.
    reference, _ = convert_state_dict(state, "coco20i", 2, source="diam")
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = model(x).logits, reference(x).logits
    scale = float(expected.abs().max())
    assert 1e-3 < scale < 1e4
    # Reloaded models match to float rounding (STACK.md), so the tolerance is relative to the logit scale.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)

    # The biased converted classifier goes through few-shot adaptation (the code path of the pipeline) and keeps its
    # base rows and biases bit-identical while a novel class is appended.
    from gfss_hf.learning import learn_classes

    base_weight, base_bias = model.classifier.weight.clone(), model.classifier.bias.clone()
    image = (torch.rand(65, 65, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()
    mask = torch.zeros(65, 65, dtype=torch.uint8)
    mask[10:40, 20:50] = 1
    small = GFSSImageProcessor(image_size=65, pad_mode="zero")  # a small canvas keeps the ResNet-50 forward cheap
    learned = learn_classes(model, [image], [mask.numpy()], ["my-object"], image_processor=small, steps=5)
    assert learned == ["my-object"] and model.config.class_names[-1] == "my-object"
    assert torch.equal(model.classifier.weight[:61], base_weight)
    assert torch.equal(model.classifier.bias[:61], base_bias) and model.classifier.bias.shape == (62,)
    with torch.no_grad():
        assert model(x).logits.shape == (1, 62, 65, 65)

    # The converted folder works in the few-shot pipeline (at the source's 417 canvas, GFSS over 61 + 1 classes).
    from transformers import pipeline

    pipe = pipeline("few-shot-segmentation", model=str(out), device="cpu")
    result = pipe(
        image,
        support_images=[image],
        support_masks=[mask.numpy()],
        class_names=["my-object"],
        steps=5,
        return_label_map=True,
    )
    assert result["label_map"].shape == (65, 65) and result["id2label"][61] == "my-object"
    assert pipe.model.config.num_labels == 61  # the pipeline does not change the loaded model

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"
    assert "sinahmr/DIaM" in card.text and "a61e1ed5" in card.text
    assert "mapped      362 tensors" in card.text and "classifier_bias=True" in card.text
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["layout"] == "repri" and report["source"] == "diam" and len(report["checkpoint_sha256"]) == 64

    # A second run refuses to clobber the folder unless asked.
    with pytest.raises(FileExistsError, match="--overwrite"):
        script.main(["--checkpoint", str(checkpoint), "--dataset", "coco20i", "--fold", "2", "--output_dir", str(out)])


def test_script_refuses_resnet101_without_writing(tmp_path):
    checkpoint = tmp_path / "r101.pth"
    torch.save(
        {
            "state_dict": {
                "module.layer0.0.weight": torch.zeros(64, 3, 3, 3),
                "module.layer1.0.conv1.weight": torch.zeros(64, 128, 1, 1),
                "module.layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1),
            }
        },
        checkpoint,
    )
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="ResNet-101"):
        load_script().main(
            ["--checkpoint", str(checkpoint), "--dataset", "pascal5i", "--fold", "0", "--output_dir", str(out)]
        )
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_script_refuses_an_unusable_image_size(tmp_path, value, capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(["--checkpoint", "x.pth", "--output_dir", str(tmp_path / "o"), "--image_size", value])
    assert "--image_size" in capsys.readouterr().err
