"""Backbones other than the ResNet (issue #18): ConvNeXt and DINOv2 ViTs through timm's feature API, pre-trained
weights from a local file or a timm tag (download mocked: no network), normalisation from timm's pretrained_cfg,
frozen-backbone pre-training, and the Hub export / pipeline of such a model."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from gfss_hf import GFSSConfig, GFSSImageProcessor, GFSSModel
from gfss_hf.adaptation import AdaptationConfig, adapt_classifier
from gfss_hf.conversion import backbone_normalization, fetch_backbone_weights, load_backbone_weights
from gfss_hf.training import build_model, model_config_kwargs, pretrain
from gfss_hf.training_config import TrainingConfig

REPO = Path(__file__).resolve().parents[1]
VIT = "vit_small_patch14_dinov2"
VIT_KWARGS = {"depth": 2, "embed_dim": 64, "num_heads": 2}
VIT_HUB_ID = "timm/vit_small_patch14_dinov2.lvd142m"

# One tiny config per family: (backbone, output_stride, backbone_kwargs, image_size, expected stride).
FAMILIES = {
    "resnet": ("test_resnet", 8, {}, 64, 8),
    "convnext": ("convnext_atto", 8, {}, 64, 8),
    "vit": (VIT, None, VIT_KWARGS, 56, 14),
}


def family_config(family, **overrides):
    backbone, output_stride, kwargs, image_size, _ = FAMILIES[family]
    values = dict(
        backbone=backbone,
        output_stride=output_stride,
        backbone_kwargs=kwargs,
        image_size=image_size,
        hidden_size=16,
        projection_dim=8,
        base_class_names=("a", "b"),
    )
    return GFSSConfig(**{**values, **overrides})


def tiny_vit_model(**overrides):
    torch.manual_seed(0)
    return GFSSModel(family_config("vit", **overrides)).eval()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


# -- every family: shapes, save / load, expansion, one adaptation episode -------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_forward_save_load_expand_and_adapt(family, tmp_path):
    torch.manual_seed(0)
    config = family_config(family)
    model = GFSSModel(config).eval()
    stride, size = FAMILIES[family][4], config.image_size
    # Stride and channels come from timm's feature info, not from literals.
    assert model.feature_stride == stride == model.backbone.feature_info.reduction()[-1]
    first_conv = model.decoder.stages[0][1]
    assert first_conv.in_channels == model.backbone.feature_info.channels()[-1]

    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(pixels, output_embeddings=True, output_backbone_features=True)
    h = size // stride
    assert out.logits.shape == (2, 3, size, size)
    assert out.features.shape == (2, 16, h, h)
    assert out.embeddings.shape == (2, 8, h, h)
    assert out.backbone_features.shape[1:] == (model.backbone.feature_info.channels()[-1], h, h)

    model.save_pretrained(tmp_path / "m")
    reloaded = GFSSModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, out.logits, rtol=1e-5, atol=1e-6)

    model.expand_classifier(["novel"])
    with torch.no_grad():
        expanded = model(pixels).logits
    torch.testing.assert_close(expanded[:, :3], out.logits, rtol=1e-5, atol=1e-6)
    assert expanded.shape[1] == 4

    with torch.no_grad():
        support = reloaded.extract_features(pixels[:1])
    labels = torch.zeros(1, size, size, dtype=torch.long)
    labels[:, size // 4 : size // 2, size // 4 : size // 2] = 1
    adapted = adapt_classifier(
        reloaded,
        support,
        labels,
        AdaptationConfig(steps=3),
        support_classes=torch.tensor([0]),
        num_novel_classes=1,
    )
    assert adapted.weight.shape == (4, 16) and torch.isfinite(adapted.weight).all()


# -- ViT rules -------------------------------------------------------------------------------------------------------
def test_vit_output_stride_and_patch_multiples_are_explained():
    with pytest.raises(ValueError, match=r"cannot change its output stride.*output_stride=None"):
        GFSSModel(family_config("vit", output_stride=8))
    with pytest.raises(ValueError, match="not a multiple of the patch size 14.*use 56 or 70"):
        GFSSModel(family_config("vit", image_size=60))
    model = tiny_vit_model()
    with pytest.raises(ValueError, match="multiples of 14"):
        model(torch.randn(1, 3, 57, 57))
    # dynamic_img_size: another multiple of the patch size works without rebuilding the model.
    with torch.no_grad():
        assert model(torch.randn(1, 3, 98, 98)).features.shape[-2:] == (7, 7)


def test_convnext_honours_output_stride():
    assert GFSSModel(family_config("convnext", output_stride=16)).feature_stride == 16
    assert GFSSModel(family_config("convnext", output_stride=None)).feature_stride == 32


# -- weights ---------------------------------------------------------------------------------------------------------
def _timm_vit_file(tmp_path):
    # Random weights in timm's own layout (a full model, with its head), as a timm Hub repo stores them.
    torch.manual_seed(1)
    reference = timm.create_model(VIT, pretrained=False, img_size=56, **VIT_KWARGS)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return path, state


def _assert_vit_weights_loaded(model, state):
    loaded = model.backbone.model.state_dict()
    compared = [key for key in loaded if key in state]
    assert len(compared) >= len(loaded) - 1 and "blocks.1.mlp.fc2.weight" in compared
    for key in compared:
        assert torch.equal(loaded[key], state[key]), key


def test_local_file_in_timm_layout_is_loaded_tensor_by_tensor(tmp_path):
    path, state = _timm_vit_file(tmp_path)
    model = tiny_vit_model(backbone_pretrained=str(path))
    report = load_backbone_weights(model)
    assert report["missing"] == [] and report["unexpected"] == []
    _assert_vit_weights_loaded(model, state)

    torch.manual_seed(2)
    convnext = timm.create_model("convnext_atto", pretrained=False)
    save_file({k: v.contiguous() for k, v in convnext.state_dict().items()}, str(tmp_path / "convnext.safetensors"))
    model = GFSSModel(family_config("convnext"))
    load_backbone_weights(model, tmp_path / "convnext.safetensors")
    # timm's features_only wrapper flattens `stem.0` to `stem_0`: the twin load takes care of it.
    assert torch.equal(model.backbone.stem_0.weight, convnext.stem[0].weight)
    assert torch.equal(model.backbone.stages_3.blocks[1].mlp.fc2.weight, convnext.stages[3].blocks[1].mlp.fc2.weight)


def test_timm_tag_is_downloaded_from_its_hub_repo(tmp_path, monkeypatch):
    import huggingface_hub

    path, state = _timm_vit_file(tmp_path)
    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = tiny_vit_model(backbone_pretrained=VIT_HUB_ID)
    load_backbone_weights(model)
    assert calls == [{"repo_id": VIT_HUB_ID, "filename": "model.safetensors"}]
    _assert_vit_weights_loaded(model, state)
    # A tag without the `timm/` prefix names the same repository.
    assert fetch_backbone_weights("resnet50s.gluon_in1k") == str(path)
    assert calls[-1] == {"repo_id": "timm/resnet50s.gluon_in1k", "filename": "model.safetensors"}


def test_offline_error_says_what_to_download_and_where(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(**kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(OSError) as info:
        load_backbone_weights(tiny_vit_model(backbone_pretrained=VIT_HUB_ID))
    message = str(info.value)
    for part in (VIT_HUB_ID, "model.safetensors", "hf download", "--set model.backbone_pretrained=/path/to/"):
        assert part in message


def test_wrong_weights_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="holds weights of 'resnet50s'.*model.backbone=resnet50s"):
        load_backbone_weights(tiny_vit_model(), "resnet50s.gluon_in1k")
    with pytest.raises(ValueError, match="neither an existing file nor a timm pretrained tag"):
        load_backbone_weights(tiny_vit_model(), "no_such_model.tag")
    # ResNet / PSPNet weights offered to a ViT: named, not a list of missing keys.
    resnet = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in resnet.state_dict().items()}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ValueError, match="ResNet / PSPNet weights"):
        load_backbone_weights(tiny_vit_model(), tmp_path / "resnet.safetensors")
    # The older local-file field is the same mechanism.
    assert GFSSConfig(backbone_weights_path="w.safetensors").backbone_pretrained == "w.safetensors"


def test_normalisation_comes_from_the_pretrained_cfg():
    clip = "timm/vit_base_patch16_clip_224.openai"
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_clip_224.openai")
    mean, std = backbone_normalization(clip)
    assert mean == pytest.approx(cfg.mean) and std == pytest.approx(cfg.std) and mean[0] != 0.485
    model = {"backbone": "vit_base_patch16_clip_224", "output_stride": None, "backbone_pretrained": clip}
    run = TrainingConfig.from_dict({"model": model, "output_dir": "unused"})
    config = GFSSConfig(**model_config_kwargs(run))
    processor = GFSSImageProcessor.from_config(config)
    assert processor.image_mean == pytest.approx(cfg.mean) and processor.image_std == pytest.approx(cfg.std)
    # Without weights: ImageNet's, as before.
    assert GFSSImageProcessor.from_config(GFSSConfig()).image_mean == pytest.approx([0.485, 0.456, 0.406])


# -- frozen-backbone pre-training, export and pipeline ------------------------------------------------------------
TINY_VIT_RUN = dict(
    dataset="synthetic",
    fold=0,
    num_train_images=16,
    num_val_images=4,
    model=dict(backbone=VIT, backbone_kwargs=VIT_KWARGS, output_stride=None, hidden_size=16, image_size=56),
    freeze_backbone=True,
    contrastive_weight=0.0,
    batch_size=4,
    num_workers=0,
    optimizer="adamw",
    learning_rate=0.01,
    logging_steps=1,
    report_to="none",
    eval_every_epochs=0,
    max_steps=3,
)


def test_frozen_backbone_run_keeps_the_backbone_and_round_trips(tmp_path):
    from transformers import AutoModel, pipeline

    import gfss_hf  # noqa: F401  (registers the Auto classes and the pipeline)

    config = TrainingConfig.from_dict({**TINY_VIT_RUN, "output_dir": str(tmp_path / "run")})
    initial = {k: v.clone() for k, v in build_model(config).state_dict().items()}
    summary = pretrain(config)
    assert 0.0 <= summary["final_eval"]["base_miou"] <= 1.0
    saved = load_file(tmp_path / "run" / "model.safetensors")
    backbone = [k for k in initial if k.startswith("backbone.")]
    assert backbone and all(torch.equal(saved[k], initial[k]) for k in backbone)
    assert not torch.equal(saved["decoder.bottleneck.0.weight"], initial["decoder.bottleneck.0.weight"])
    assert not torch.equal(saved["classifier.weight"], initial["classifier.weight"])

    model = AutoModel.from_pretrained(tmp_path / "run")
    assert type(model).__name__ == "GFSSModel" and model.feature_stride == 14
    pipe = pipeline("few-shot-segmentation", model=str(tmp_path / "run"), device="cpu")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((50, 70), np.uint8)
    mask[10:30, 20:40] = 255
    out = pipe(
        image,
        support_images=[image],
        support_masks=[Image.fromarray(mask, "L")],
        class_names=["thing"],
        return_label_map=True,
        steps=5,
    )
    assert out["label_map"].shape == (50, 70)

    # The Space runs the same model.
    import importlib.util

    spec = importlib.util.spec_from_file_location("gfss_space_app_vit", REPO / "spaces" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    name, paths = app.load_examples()[1]
    editor = {
        "background": Image.open(paths["support"]),
        "layers": [Image.open(paths["layer"])],
        "composite": Image.open(paths["composite"]),
    }
    query = Image.open(paths["query"])
    (overlay, _), _, _ = app.segment(app.FewShotSegmenter(str(tmp_path / "run")), query, [editor], name, "GFSS", 10, 5)
    assert overlay.size == query.size


def test_freeze_backbone_keeps_bn_statistics_and_optimizes_the_rest():
    config = TrainingConfig.from_dict({**TINY_VIT_RUN, "model": {"backbone": "test_resnet"}, "output_dir": "x"})
    model = build_model(config).train()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
    assert not model.backbone.training and model.decoder.training
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in before.items())


def test_pretrain_script_with_a_frozen_dinov2_then_trust_remote_code_export(tmp_path):
    run = {k: v for k, v in TINY_VIT_RUN.items() if k not in ("model", "freeze_backbone")}
    (tmp_path / "tiny.yaml").write_text(json.dumps({**run, "model": {"hidden_size": 16}}))
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "pretrain.py"),
        "--config",
        str(tmp_path / "tiny.yaml"),
        "--output_dir",
        str(tmp_path / "run"),
        "--set",
        f"model.backbone={VIT}",
        "--set",
        f"model.backbone_kwargs={json.dumps(VIT_KWARGS)}",
        "--set",
        "model.output_stride=null",
        "--set",
        "model.image_size=56",
        "--set",
        "freeze_backbone=true",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["backbone"] == VIT and config["output_stride"] is None

    # Episodic evaluation on the procedural data reads the ViT's stride-14 features.
    cmd = [sys.executable, str(REPO / "scripts" / "evaluate.py"), str(tmp_path / "run"), "--dataset", "synthetic"]
    cmd += ["--num_val_images", "20", "--num_episodes", "2", "--steps", "3", "--output_dir", str(tmp_path / "eval")]
    result = subprocess.run(cmd + ["--no_progress"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gfss_base_miou" in (tmp_path / "eval" / "results.json").read_text()

    # The same model exported for trust_remote_code loads in a process without the package.
    model = GFSSModel.from_pretrained(tmp_path / "run").eval()
    model.save_pretrained(tmp_path / "export")
    GFSSImageProcessor.from_config(model.config).save_pretrained(tmp_path / "export")
    pixels = torch.randn(1, 3, 56, 56)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(model(pixels).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gfss_hf"] = None
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "export")!r}, trust_remote_code=True).eval()
        assert "transformers_modules" in type(model).__module__
        with torch.no_grad():
            logits = model(pixel_values=torch.load({str(tmp_path / "pixels.pt")!r})).logits
        torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=1e-5, atol=1e-5)
        print("REMOTE-OK")
    """)
    (tmp_path / "check.py").write_text(script)
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"} | {"HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, str(tmp_path / "check.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_kwargs_of_another_architecture_are_named():
    with pytest.raises(ValueError, match=r"backbone_kwargs=\{'channels'.*--set model.backbone_kwargs=\{\}"):
        GFSSModel(family_config("vit", backbone_kwargs={"channels": [16, 32, 64, 128]}))


def test_bench_script_runs(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_backbones", REPO / "bench" / "backbones.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--only", "resnet18-quarter", "--repeats", "1"])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| resnet18-quarter | 8 |") and "(96 px)" in row and "(240 px)" in row


def test_pretrain_script_offline_names_the_weights_to_download(tmp_path):
    # The real huggingface_hub in offline mode with an empty cache: no network is touched.
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, str(REPO / "scripts" / "pretrain.py"), "--output_dir", str(tmp_path / "run")]
    cmd += ["--set", "model.backbone=vit_small_patch14_dinov2", "--set", "model.backbone_kwargs={}"]
    cmd += ["--set", "model.output_stride=null", "--set", "model.image_size=98"]
    cmd += ["--set", f"model.backbone_pretrained={VIT_HUB_ID}", "--set", "freeze_backbone=true"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert VIT_HUB_ID in result.stderr and "model.safetensors" in result.stderr
    assert "--set model.backbone_pretrained=/path/to/model.safetensors" in result.stderr
    assert not (tmp_path / "run").exists()


def test_config_rules_of_the_new_fields():
    with pytest.raises(ValueError, match="image_mean"):
        GFSSConfig(image_mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="image_std"):
        GFSSConfig(image_std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="output_stride"):
        GFSSConfig(output_stride=True)
    with pytest.raises(ValueError, match="dilation_style='pspnet' expects a ResNet bottleneck backbone"):
        GFSSModel(family_config("convnext", dilation_style="pspnet"))
    with pytest.raises(ValueError, match="unknown key"):
        TrainingConfig.from_dict({"model": {"backbone_weights_path": "x"}, "output_dir": "x"})
