"""ModelTester-style tests of GFSSModel on a tiny config."""

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from gfss_hf import GFSSConfig, GFSSModel
from gfss_hf.conversion import load_backbone_weights, read_checkpoint

BASE = ("a", "b", "c")


def tiny_config(**overrides):
    kwargs = dict(backbone="test_resnet", hidden_size=32, image_size=64, projection_dim=16, base_class_names=BASE)
    kwargs.update(overrides)
    return GFSSConfig(**kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GFSSModel(tiny_config()).eval()


def test_output_shapes(model):
    x = torch.randn(2, 3, 64, 64)
    out = model(x, output_embeddings=True, output_backbone_features=True)
    assert out.logits.shape == (2, 4, 64, 64)
    assert out.features.shape == (2, 32, 8, 8)
    assert out.embeddings.shape == (2, 16, 8, 8)
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert out.backbone_features.shape[-2:] == (8, 8)
    assert out.loss is None
    assert isinstance(model(x, return_dict=False), tuple)


def test_non_square_input_logits_at_input_size(model):
    out = model(torch.randn(1, 3, 48, 80))
    assert out.logits.shape == (1, 4, 48, 80)
    assert out.features.shape == (1, 32, 6, 10)


def test_loss_and_backward():
    torch.manual_seed(0)
    model = GFSSModel(tiny_config()).train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 4, (2, 64, 64))
    labels[:, :5] = 255
    out = model(x, labels=labels, output_embeddings=True)
    assert out.loss.item() > 0
    (out.loss + out.embeddings.sum() * 0).backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert model.backbone.conv1[0].weight.grad.abs().sum() > 0


def test_backbone_projection_source():
    model = GFSSModel(tiny_config(projection_source="backbone")).eval()
    out = model(torch.randn(1, 3, 64, 64), output_embeddings=True)
    assert out.embeddings.shape == (1, 16, 8, 8)
    assert model.projection[0].in_channels == model.backbone.feature_info.channels()[-1]


def test_no_projection_head():
    model = GFSSModel(tiny_config(use_projection=False)).eval()
    assert model.projection is None
    with pytest.raises(ValueError, match="use_projection"):
        model(torch.randn(1, 3, 64, 64), output_embeddings=True)


def test_bad_pixel_values(model):
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model(torch.randn(3, 64, 64))


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    for auto in (AutoModel, AutoModelForSemanticSegmentation):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, GFSSModel)
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert AutoConfig.from_pretrained(tmp_path).id2label == model.config.id2label


def test_expand_classifier_keeps_base_logits_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = GFSSModel(tiny_config()).eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x).logits
    old_rows = model.classifier.weight.clone()
    rows = torch.randn(2, 32)
    model.expand_classifier(["n1", "n2"], weights=rows)
    after = model(x).logits
    assert after.shape[1] == 6
    assert torch.equal(model.classifier.weight[:4], old_rows)  # bit-identical
    torch.testing.assert_close(after[:, :4], before, rtol=0, atol=0)
    assert torch.equal(model.classifier.weight[4:, :, 0, 0], rows)
    assert model.config.novel_class_names == ("n1", "n2")
    assert model.config.id2label[5] == "n2"
    model.expand_classifier(["n3"])  # appending again, default init
    assert model.config.num_labels == 7
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert loaded.config.novel_class_names == ("n1", "n2", "n3")
    assert loaded.classifier.out_channels == 7
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_expand_classifier_rejects_existing_and_bad_shapes():
    model = GFSSModel(tiny_config())
    with pytest.raises(ValueError, match="'a' already exists"):
        model.expand_classifier(["a"])
    with pytest.raises(ValueError, match="'background' already exists"):
        model.expand_classifier(["background"])
    with pytest.raises(ValueError, match="repeats"):
        model.expand_classifier(["x", "x"])
    with pytest.raises(ValueError, match="features per row"):
        model.expand_classifier(["x"], weights=torch.randn(1, 5))
    with pytest.raises(ValueError, match="empty"):
        model.expand_classifier([])
    assert model.config.num_labels == 4  # nothing half-applied


def test_expand_classifier_with_bias():
    model = GFSSModel(tiny_config(classifier_bias=True)).eval()
    with torch.no_grad():
        model.classifier.bias.copy_(torch.arange(4.0))
    model.expand_classifier(["n"])
    assert model.classifier.bias.tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]
    model.expand_classifier(["m"], bias=torch.tensor([7.0]))
    assert model.classifier.bias[-1].item() == 7.0


def test_frozen_backbone_stays_in_eval_mode():
    model = GFSSModel(tiny_config())
    model.freeze_backbone()
    model.train()
    assert model.training and model.classifier.training
    for module in (model.backbone, model.decoder, model.projection):
        assert not module.training
        assert all(not m.training for m in module.modules())
        assert all(not p.requires_grad for p in module.parameters())
    assert model.classifier.weight.requires_grad
    # BN statistics do not move in a training-mode forward
    bn = model.decoder.bottleneck[1]
    stats = bn.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, stats)
    # dropout is off: two forwards agree
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(x).features, model(x).features)
    model.unfreeze_backbone()
    model.train()
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())


def test_pspnet_dilation_style_changes_first_blocks_only():
    model = GFSSModel(GFSSConfig(base_class_names=BASE, dilation_style="pspnet", hidden_size=64, use_projection=False))
    assert model.backbone.layer3[0].conv2.dilation == (2, 2) and model.backbone.layer3[0].conv2.padding == (2, 2)
    assert model.backbone.layer4[0].conv2.dilation == (4, 4) and model.backbone.layer4[0].conv2.padding == (4, 4)
    timm_style = GFSSModel(GFSSConfig(base_class_names=BASE, hidden_size=64, use_projection=False))
    assert timm_style.backbone.layer3[0].conv2.dilation == (1, 1)
    assert timm_style.backbone.layer4[0].conv2.dilation == (2, 2)
    assert timm_style.backbone.layer4[1].conv2.dilation == (4, 4)
    with pytest.raises(ValueError, match="output_stride=8"):
        GFSSModel(GFSSConfig(base_class_names=BASE, dilation_style="pspnet", output_stride=16))


def test_load_backbone_weights_timm_and_flat_stem(tmp_path):
    import timm
    from safetensors.torch import save_file

    config = tiny_config(backbone="resnet18", backbone_kwargs={"channels": (8, 16, 32, 64)})
    model = GFSSModel(config)
    source = timm.create_model("resnet18", pretrained=False, channels=(8, 16, 32, 64))
    state = source.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    report = load_backbone_weights(model, tmp_path / "w.safetensors")
    assert sorted(report["dropped"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    # a 7x7 stem into a deep-stem model is refused with the reason
    deep = GFSSModel(tiny_config(backbone="resnet50s", hidden_size=16, use_projection=False))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(2, 2)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="7x7 stem"):
        load_backbone_weights(deep, tmp_path / "plain.pth")


def test_load_backbone_weights_flat_deep_stem(tmp_path):
    import timm

    model = GFSSModel(tiny_config(backbone="resnet50s", hidden_size=16, use_projection=False))
    source = timm.create_model("resnet50s", pretrained=False).state_dict()
    # the flat layout of a semseg-style ImageNet file: conv1/bn1/conv2/bn2/conv3/bn3
    flat_names = {
        "conv1.0.": "conv1.",
        "conv1.1.": "bn1.",
        "conv1.3.": "conv2.",
        "conv1.4.": "bn2.",
        "conv1.6.": "conv3.",
    }
    flat = {}
    for key, value in source.items():
        new = key
        if key.startswith("bn1."):
            new = "bn3." + key[4:]
        for src, dst in flat_names.items():
            if key.startswith(src):
                new = dst + key[len(src) :]
        flat[new] = torch.randn_like(value.float()).to(value.dtype) if value.is_floating_point() else value
    torch.save({"state_dict": {"module." + k: v for k, v in flat.items()}}, tmp_path / "resnet50_v2.pth")
    report = load_backbone_weights(model, tmp_path / "resnet50_v2.pth")
    assert not report["missing"] and not report["unexpected"]
    assert torch.equal(model.backbone.conv1[1].weight, flat["bn1.weight"])
    assert torch.equal(model.backbone.bn1.weight, flat["bn3.weight"])
    assert torch.equal(model.backbone.conv1[6].weight, flat["conv3.weight"])


def test_backbone_weight_file_errors(tmp_path):
    # Backbone weights are read by the one weight-file reader, conversion.read_checkpoint.
    model = GFSSModel(tiny_config())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_weights(model, tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_backbone_weights(model, tmp_path / "bad.pth")


@pytest.mark.fullsize
def test_full_size_default_config_forward():
    config = GFSSConfig(base_class_names=tuple(f"c{i}" for i in range(15)))
    model = GFSSModel(config).eval()
    assert config.backbone == "resnet50s" and config.image_size == 473
    with torch.no_grad():
        out = model(torch.randn(1, 3, 473, 473), output_embeddings=True)
    assert out.features.shape == (1, 512, 60, 60)
    assert out.logits.shape == (1, 16, 473, 473)
    assert out.embeddings.shape == (1, 256, 60, 60)
    assert np.isfinite(out.logits.numpy()).all()
    n_params = sum(p.numel() for p in model.parameters())
    assert 40e6 < n_params < 60e6  # ResNet-50 deep stem (25.6M) + PSP head (~21M) + projection
