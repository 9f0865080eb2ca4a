"""Conversion of released PSPNet / ImageNet checkpoints (CHECKPOINTS.md).

Source state dicts are built here from the key names and shapes of the spec (full ResNet-50 shapes, random values,
built once per module). Three layouts are also checked functionally: an independent re-implementation of the source
architecture (semseg-style `layer0` stem, PSPNet dilation, the source's head) written in this file from the spec, not
from timm, must give the same logits as the converted GFSSModel.
"""

from __future__ import annotations

import io
import math
import stat

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gfss_hf.conversion import (
    LAYOUTS,
    ConversionReport,
    convert_checkpoint,
    convert_state_dict,
    detect_layout,
    load_backbone_weights,
    read_checkpoint,
    save_converted,
    unwrap_checkpoint,
)
from gfss_hf.data.splits import get_split

# ------------------------------------------------------------------------------------------------------------------
# Shapes of the spec (CHECKPOINTS.md 1.1): timm resnet50s features_only keys.
# ------------------------------------------------------------------------------------------------------------------
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
LAYER_SPEC = {1: (3, 64, 128), 2: (4, 128, 256), 3: (6, 256, 512), 4: (3, 512, 1024)}  # blocks, width, in of block 0


def bn_shapes(prefix, channels):
    return {f"{prefix}.{p}": (() if p == "num_batches_tracked" else (channels,)) for p in BN}


def resnet50s_shapes():
    shapes = {"conv1.0.weight": (64, 3, 3, 3), "conv1.3.weight": (64, 64, 3, 3), "conv1.6.weight": (128, 64, 3, 3)}
    shapes.update(bn_shapes("conv1.1", 64) | bn_shapes("conv1.4", 64) | bn_shapes("bn1", 128))
    for layer, (blocks, width, in0) in LAYER_SPEC.items():
        for b in range(blocks):
            cin = in0 if b == 0 else 4 * width
            p = f"layer{layer}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, cin, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{p}.conv3.weight"] = (4 * width, width, 1, 1)
            shapes.update(
                bn_shapes(f"{p}.bn1", width) | bn_shapes(f"{p}.bn2", width) | bn_shapes(f"{p}.bn3", 4 * width)
            )
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (4 * width, in0, 1, 1)
                shapes.update(bn_shapes(f"{p}.downsample.1", 4 * width))
    return shapes


def random_tensor(shape, generator, name=""):
    if name.endswith("num_batches_tracked"):
        return torch.tensor(int(torch.randint(1, 1000, (), generator=generator)))
    if name.endswith("running_var"):
        return torch.rand(shape, generator=generator) + 0.5
    return torch.randn(shape, generator=generator)


@pytest.fixture(scope="module")
def canon():
    """Random tensors under OUR target names: backbone (330), PPM + bottleneck, and a 16-row biased classifier."""
    g = torch.Generator().manual_seed(0)
    shapes = {f"backbone.{k}": v for k, v in resnet50s_shapes().items()}
    assert len(shapes) == 330  # the spec's count
    for i in range(4):
        shapes[f"decoder.stages.{i}.1.weight"] = (512, 2048, 1, 1)
        shapes.update(bn_shapes(f"decoder.stages.{i}.2", 512))
    shapes["decoder.bottleneck.0.weight"] = (512, 4096, 3, 3)
    shapes.update(bn_shapes("decoder.bottleneck.1", 512))
    shapes["classifier.weight"] = (16, 512, 1, 1)
    shapes["classifier.bias"] = (16,)
    return {k: random_tensor(s, g, k) for k, s in shapes.items()}


# Spec tables, written out here independently of gfss_hf.conversion.
RULE_S_STEM = {
    "layer0.0": "conv1.0",
    "layer0.1": "conv1.1",
    "layer0.3": "conv1.3",
    "layer0.4": "conv1.4",
    "layer0.6": "conv1.6",
    "layer0.7": "bn1",
}
RULE_F_STEM = {
    "conv1": "conv1.0",
    "bn1": "conv1.1",
    "conv2": "conv1.3",
    "bn2": "conv1.4",
    "conv3": "conv1.6",
    "bn3": "bn1",
}


def backbone_part(canon, stem_table, prefix="", with_nbt=True):
    """Source dict + expected {source key: target key} for the backbone, with the given stem naming."""
    inverse = {v: k for k, v in stem_table.items()}
    src, expect = {}, {}
    for target, value in canon.items():
        if not target.startswith("backbone."):
            continue
        key = target[len("backbone.") :]
        if not with_nbt and key.endswith("num_batches_tracked"):
            continue
        if not key.startswith("layer"):
            module, param = key.rsplit(".", 1)
            key = f"{inverse[module]}.{param}"
        src[prefix + key] = value
        expect[prefix + key] = target
    return src, expect


def ppm_part(canon, prefix):
    src, expect = {}, {}
    for i in range(4):
        for target in [f"decoder.stages.{i}.1.weight"] + [f"decoder.stages.{i}.2.{p}" for p in BN]:
            key = prefix + f"{i}." + target[len(f"decoder.stages.{i}.") :]
            src[key], expect[key] = canon[target], target
    return src, expect


def head_part(canon, conv, bn, classifier=None, rows=16):
    src, expect = (
        {f"{conv}.weight": canon["decoder.bottleneck.0.weight"]},
        {f"{conv}.weight": "decoder.bottleneck.0.weight"},
    )
    for p in BN:
        src[f"{bn}.{p}"], expect[f"{bn}.{p}"] = canon[f"decoder.bottleneck.1.{p}"], f"decoder.bottleneck.1.{p}"
    if classifier:
        g = torch.Generator().manual_seed(rows)
        src[f"{classifier}.weight"] = (
            canon["classifier.weight"] if rows == 16 else torch.randn(rows, 512, 1, 1, generator=g)
        )
        src[f"{classifier}.bias"] = canon["classifier.bias"] if rows == 16 else torch.randn(rows, generator=g)
        expect[f"{classifier}.weight"], expect[f"{classifier}.bias"] = "classifier.weight", "classifier.bias"
    return src, expect


def extra(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: random_tensor(s, g, k) for k, s in shapes.items()}


def merge(*parts):
    src, expect = {}, {}
    for s, e in parts:
        src.update(s)
        expect.update(e)
    return src, expect


def build_layout(layout, canon):
    """(source state dict, expected source->target mapping, expected dropped keys) for one layout."""
    if layout == "repri":
        src, expect = merge(
            backbone_part(canon, RULE_S_STEM),
            ppm_part(canon, "ppm.features."),
            head_part(canon, "bottleneck.0", "bottleneck.1", "classifier"),
        )
        return src, expect, set()
    if layout == "semseg":
        src, expect = merge(
            backbone_part(canon, RULE_S_STEM),
            ppm_part(canon, "ppm.features."),
            head_part(canon, "cls.0", "cls.1", "cls.4", rows=21),
        )
        aux = extra(
            {
                "aux.0.weight": (256, 1024, 3, 3),
                **bn_shapes("aux.1", 256),
                "aux.4.weight": (21, 256, 1, 1),
                "aux.4.bias": (21,),
            }
        )
        return {**src, **aux}, expect, set(aux)
    if layout == "bam":
        src, expect = merge(
            backbone_part(canon, RULE_S_STEM),
            ppm_part(canon, "ppm.features."),
            head_part(canon, "cls.0", "cls.1", "cls.4"),
        )
        encoder = {
            f"encoder.{k[len('layer')]}.{k.split('.', 1)[1]}": v for k, v in src.items() if k.startswith("layer")
        }
        assert len(encoder) == 330
        return {**src, **encoder}, expect, set(encoder)
    if layout == "bam-full":
        src, expect = merge(
            backbone_part(canon, RULE_S_STEM),
            ppm_part(canon, "learner_base.0.features."),
            head_part(canon, "learner_base.1.0", "learner_base.1.1", "learner_base.1.4"),
        )
        meta = extra(
            {
                "down_query.0.weight": (256, 1536, 1, 1),
                "down_supp.0.weight": (256, 1536, 1, 1),
                "init_merge.0.0.weight": (256, 513, 1, 1),
                "ASPP_meta.layer6_0.0.weight": (256, 256, 1, 1),
                "res1_meta.0.weight": (256, 1280, 1, 1),
                "res2_meta.0.weight": (256, 256, 3, 3),
                "cls_meta.0.weight": (256, 256, 3, 3),
                "cls_meta.3.weight": (2, 256, 1, 1),
                "cls_meta.3.bias": (2,),
                "gram_merge.weight": (1, 2, 1, 1),
                "cls_merge.weight": (1, 2, 1, 1),
            }
        )
        return {**src, **meta}, expect, set(meta)
    if layout == "pfenet":
        src, expect = backbone_part(canon, RULE_S_STEM)
        shapes = {
            "down_query.0.weight": (256, 1536, 1, 1),
            "down_supp.0.weight": (256, 1536, 1, 1),
            "res1.0.weight": (256, 1024, 1, 1),
            "res2.0.weight": (256, 256, 3, 3),
            "res2.2.weight": (256, 256, 3, 3),
            "cls.0.weight": (256, 256, 3, 3),
            "cls.3.weight": (2, 256, 1, 1),
            "cls.3.bias": (2,),
        }
        for i in range(4):
            shapes[f"init_merge.{i}.0.weight"] = (256, 513, 1, 1)
            shapes[f"beta_conv.{i}.0.weight"] = shapes[f"beta_conv.{i}.2.weight"] = (256, 256, 3, 3)
            shapes[f"inner_cls.{i}.0.weight"] = (256, 256, 3, 3)
            shapes[f"inner_cls.{i}.3.weight"], shapes[f"inner_cls.{i}.3.bias"] = (2, 256, 1, 1), (2,)
        for i in range(3):
            shapes[f"alpha_conv.{i}.0.weight"] = (256, 512, 1, 1)
        meta = extra(shapes)
        assert len(src) + len(meta) == 365  # the spec's count
        return {**src, **meta}, expect, set(meta)
    if layout == "capl":
        src, expect = merge(
            backbone_part(canon, RULE_S_STEM), ppm_part(canon, "ppm.features."), head_part(canon, "cls.0", "cls.1")
        )
        drops = extra(
            {
                "cls.4.weight": (512, 512, 1, 1),
                "cls.4.bias": (512,),
                "aux.0.weight": (256, 1024, 3, 3),
                **bn_shapes("aux.1", 256),
                "aux.4.weight": (256, 256, 1, 1),
                "aux.4.bias": (256,),
                "main_proto": (21, 512),
                "aux_proto": (21, 256),
                "gamma_conv.0.weight": (512, 1024),
                "gamma_conv.2.weight": (1, 512),
                "gamma_conv.2.bias": (1,),
            }
        )
        assert len(src) + len(drops) == 375  # the spec's count
        return {**src, **drops}, expect, set(drops)
    if layout == "pop":
        src, expect = merge(
            backbone_part(canon, RULE_F_STEM, prefix="backbone."),
            ppm_part(canon, "decoder.stages."),
            head_part(canon, "decoder.bottleneck.0", "decoder.bottleneck.1"),
        )
        # POP concatenates [stages, layer4]: its weight is ours with the two input halves swapped.
        ours = canon["decoder.bottleneck.0.weight"]
        src["decoder.bottleneck.0.weight"] = torch.cat([ours[:, 2048:], ours[:, :2048]], dim=1)
        drops = extra(
            {
                "decoder.bottleneck.3.weight": (512, 512, 1, 1),
                "decoder.bottleneck.3.bias": (512,),
                "base_emb": (15, 512),
                "classifier.0.weight": (512, 512, 1, 1),
                "classifier.2.weight": (512, 512, 1, 1),
                "classifier.4.weight": (1, 512, 1, 1),
            }
        )
        assert len(src) + len(drops) == 366  # the spec's count
        return {**src, **drops}, expect, set(drops)
    if layout == "imagenet-semseg":
        src, expect = backbone_part(canon, RULE_F_STEM, with_nbt=False)  # resnet50_v2.pth predates num_batches_tracked
        fc = extra({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
        return {**src, **fc}, expect, set(fc)
    if layout == "imagenet-timm":
        src, expect = backbone_part(
            canon,
            {
                "conv1.0": "conv1.0",
                "conv1.1": "conv1.1",
                "conv1.3": "conv1.3",
                "conv1.4": "conv1.4",
                "conv1.6": "conv1.6",
                "bn1": "bn1",
            },
        )
        fc = extra({"fc.weight": (1000, 2048), "fc.bias": (1000,)})
        return {**src, **fc}, expect, set(fc)
    raise AssertionError(layout)


# (dilation, ppm_align_corners, classifier_bias, image_size, pad_mode, classifier mapped, decoder mapped)
EXPECTED_CONFIG = {
    "capl": ("pspnet", True, False, 473, "zero", False, True),
    "pop": ("pspnet", False, False, 473, "mean", False, True),
    "bam-full": ("pspnet", True, True, 417, "zero", True, True),
    "pfenet": ("pspnet", True, False, 473, "zero", False, False),
    "bam": ("pspnet", True, True, 417, "zero", True, True),
    "semseg": ("pspnet", True, True, 473, "mean", True, True),
    "repri": ("pspnet", True, True, 417, "zero", True, True),
    "imagenet-semseg": ("timm", True, False, 473, "mean", False, False),
    "imagenet-timm": ("timm", True, False, 473, "mean", False, False),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_tensor_lands_where_the_spec_says(layout, canon):
    src, expect, drops = build_layout(layout, canon)
    # Released files are DataParallel-wrapped inside a training container; the converter must unwrap both.
    wrapped = {"epoch": 50, "state_dict": {f"module.{k}": v for k, v in src.items()}, "optimizer": {"state": {}}}
    assert detect_layout(wrapped) == layout
    model, report = convert_state_dict(wrapped, dataset="pascal5i", fold=0)
    assert report.layout == layout
    assert report.mapped == expect
    assert set(report.dropped) == drops
    assert report.unexpected == []
    state = model.state_dict()
    for source_key, target_key in expect.items():
        if layout == "pop" and target_key == "decoder.bottleneck.0.weight":
            # POP's input channels are permuted on the way in: the result is our canonical weight, not the source's.
            assert torch.equal(state[target_key], canon[target_key])
            assert not torch.equal(state[target_key], src[source_key])
            continue
        assert torch.equal(state[target_key], src[source_key]), f"{source_key} -> {target_key}"
    dilation, align, bias, size, pad, has_classifier, has_decoder = EXPECTED_CONFIG[layout]
    config = model.config
    assert (config.dilation_style, config.ppm_align_corners, config.classifier_bias) == (dilation, align, bias)
    assert (config.image_size, config.pad_mode) == (size, pad)
    assert config.backbone == "resnet50s" and not model.training
    missing_groups = {k.split(".")[0] for k in report.missing}
    assert ("classifier" in missing_groups) == (not has_classifier)
    assert ("decoder" in missing_groups) == (not has_decoder)
    assert "backbone" not in missing_groups
    if layout == "imagenet-semseg":  # absent num_batches_tracked keeps the target's value, not reported missing
        assert int(state["backbone.bn1.num_batches_tracked"]) == 0
    split = get_split("pascal5i", 0)
    if layout == "semseg":  # a VOC model: background + all 20 classes, flagged as not a base learner
        assert config.class_names == ["background", *split.class_names]
        assert any("full-dataset" in note for note in report.notes)
    elif layout.startswith("imagenet"):
        assert config.use_projection and config.class_names == ["background", *split.base_names]
    else:
        assert config.class_names == ["background", *split.base_names] and not config.use_projection
    assert config.dataset == "pascal5i" and config.fold == 0 and layout in config.source_checkpoint
    text = report.summary()
    assert f"mapped     {len(expect):4d}" in text and f"dropped    {len(drops):4d}" in text


# ------------------------------------------------------------------------------------------------------------------
# Functional equivalence with re-implementations of the source architectures (written from the spec).
# ------------------------------------------------------------------------------------------------------------------
class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def ref_layer(inplanes, planes, blocks, stride, dilation):
    down = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
    layers = [RefBottleneck(inplanes, planes, stride, dilation, down)]
    layers += [RefBottleneck(planes * 4, planes, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class RefPPM(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512), nn.ReLU())
            for b in (1, 2, 3, 6)
        )

    def forward(self, x):
        size = x.shape[-2:]
        return torch.cat(
            [x] + [F.interpolate(f(x), size, mode="bilinear", align_corners=True) for f in self.features], 1
        )


class RefPSPNet(nn.Module):
    """semseg-family PSPNet: `layer0` stem Sequential, every block of layer3/layer4 dilated 2/4 (stride 1)."""

    def __init__(self, head, classes):
        super().__init__()
        self.layer0 = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.layer1 = ref_layer(128, 64, 3, 1, 1)
        self.layer2 = ref_layer(256, 128, 4, 2, 1)
        self.layer3 = ref_layer(512, 256, 6, 1, 2)
        self.layer4 = ref_layer(1024, 512, 3, 1, 4)
        if head == "bam":  # BAM registers the same stages a second time
            self.encoder = nn.Sequential(self.layer0, self.layer1, self.layer2, self.layer3, self.layer4)
        self.ppm = RefPPM()
        self.head = head
        bottleneck = [
            nn.Conv2d(4096, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(),
            nn.Dropout2d(0.1),
        ]
        if head == "repri":
            self.bottleneck = nn.Sequential(*bottleneck)
            self.classifier = nn.Conv2d(512, classes, 1)
        else:
            self.cls = nn.Sequential(*bottleneck, nn.Conv2d(512, classes, 1))
        if head == "semseg":
            self.aux = nn.Sequential(
                nn.Conv2d(1024, 256, 3, padding=1, bias=False),
                nn.BatchNorm2d(256),
                nn.ReLU(),
                nn.Dropout2d(0.1),
                nn.Conv2d(256, classes, 1),
            )

    def forward(self, x):
        size = x.shape[-2:]
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.layer0(x)))))
        f = self.ppm(f)
        logits = self.classifier(self.bottleneck(f)) if self.head == "repri" else self.cls(f)
        return F.interpolate(logits, size, mode="bilinear", align_corners=True)


@torch.no_grad()
def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    for name, t in module.state_dict().items():
        if name.endswith("num_batches_tracked"):
            t.fill_(5)
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("running_mean") or (name.endswith("bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif t.dim() == 1:  # BN weight
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:  # conv: variance-preserving so 16 blocks stay finite
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(t[0].numel()))


@pytest.mark.parametrize(
    ("head", "rows", "dataset"), [("repri", 16, "pascal5i"), ("bam", 61, "coco20i"), ("semseg", 21, "pascal5i")]
)
def test_converted_model_computes_the_source_logits(head, rows, dataset):
    reference = RefPSPNet(head, rows)
    randomise(reference, seed=rows)
    reference.eval()
    state = reference.state_dict()
    if head == "bam":
        assert len(state) == 692  # the spec's count: layer* and encoder.* both stored
    model, report = convert_state_dict(state, dataset=dataset, fold=1)
    assert report.layout == head and model.config.num_labels == rows
    x = torch.randn(2, 3, 65, 65, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x)
        got = model(x).logits
    assert got.shape == expected.shape == (2, rows, 65, 65)
    scale = expected.abs().max()
    assert torch.isfinite(scale) and scale > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(scale))
    if head != "repri":
        return
    # timm's own dilation (first block of layer3/layer4 undilated) is a different function: the flag matters.
    wrong, wrong_report = convert_state_dict(state, dataset=dataset, fold=1, dilation_style="timm")
    assert any("NOT" in note for note in wrong_report.notes)
    with torch.no_grad():
        assert (wrong(x).logits - expected).abs().max() > 1e-3 * float(scale)


# ------------------------------------------------------------------------------------------------------------------
# Refusals and errors
# ------------------------------------------------------------------------------------------------------------------
def test_refuses_resnet101_vgg_and_wrong_stems(canon):
    src, _, _ = build_layout("repri", canon)
    r101 = {**src, "layer3.6.conv1.weight": torch.zeros(256, 1024, 1, 1)}
    with pytest.raises(ValueError, match=r"ResNet-101.*layer3\.6\.conv1\.weight"):
        detect_layout(r101)
    with pytest.raises(ValueError, match="ResNet-101"):
        convert_state_dict(r101, "pascal5i", 0, layout="repri")
    vgg = {
        "layer0.0.weight": torch.zeros(64, 3, 3, 3),
        "layer0.0.bias": torch.zeros(64),
        "layer0.1.weight": torch.ones(64),
        "ppm.features.0.1.weight": torch.zeros(512, 512, 1, 1),
        "bottleneck.0.weight": torch.zeros(512, 4096, 3, 3),
    }
    with pytest.raises(ValueError, match=r"VGG.*layer0\.0\.bias|layer0\.0\.bias.*VGG"):
        detect_layout(vgg)
    no_bias_vgg = {k: v for k, v in vgg.items() if k != "layer0.0.bias"}
    with pytest.raises(ValueError, match=r"VGG.*layer1\.0\.conv1\.weight|layer1\.0\.conv1\.weight.*VGG"):
        detect_layout(no_bias_vgg)
    plain = {
        "conv1.weight": torch.zeros(64, 3, 7, 7),
        "bn1.weight": torch.ones(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
        "fc.weight": torch.zeros(1000, 2048),
    }
    with pytest.raises(ValueError, match="7x7"):
        detect_layout(plain)
    narrow = {
        "conv1.0.weight": torch.zeros(32, 3, 3, 3),
        "conv1.3.weight": torch.zeros(32, 32, 3, 3),
        "bn1.weight": torch.ones(64),
        "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
    }
    with pytest.raises(ValueError, match="32-wide"):
        detect_layout(narrow)
    with pytest.raises(ValueError, match="could not recognise"):
        detect_layout({"layer1.0.conv1.weight": torch.zeros(1), "foo.weight": torch.zeros(1)})


def test_missing_or_misshapen_tensor_names_the_key_and_shapes(canon):
    src, _, _ = build_layout("repri", canon)
    misshapen = {**src, "layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)}
    with pytest.raises(ValueError, match=r"'layer2\.0\.conv2\.weight'.*\(128, 128, 1, 1\).*\(128, 128, 3, 3\)"):
        convert_state_dict(misshapen, "pascal5i", 0)
    missing = {k: v for k, v in src.items() if k != "layer3.2.bn1.running_var"}
    with pytest.raises(ValueError, match=r"missing tensor.*'layer3\.2\.bn1\.running_var'.*\(256,\)"):
        convert_state_dict(missing, "pascal5i", 0)
    missing_head = {k: v for k, v in src.items() if k != "bottleneck.1.weight"}
    with pytest.raises(ValueError, match=r"'bottleneck\.1\.weight'.*\(512,\)"):
        convert_state_dict(missing_head, "pascal5i", 0)
    # 16 rows are PASCAL-5i base learners: COCO-20i (61 rows) is refused with the row counts.
    with pytest.raises(ValueError, match=r"16 rows.*61"):
        convert_state_dict(src, "coco20i", 0)
    with pytest.raises(ValueError, match="dataset= and fold="):
        convert_state_dict(src)
    unknown = {**src, "mystery.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"mystery\.weight.*strict=False"):
        convert_state_dict(unknown, "pascal5i", 0)


def test_bam_encoder_copy_must_equal_layer(canon):
    src, _, _ = build_layout("bam", canon)
    tampered = {**src, "encoder.2.0.conv1.weight": src["layer2.0.conv1.weight"] + 1}
    with pytest.raises(ValueError, match=r"'encoder\.2\.0\.conv1\.weight'.*'layer2\.0\.conv1\.weight'"):
        convert_state_dict(tampered, "pascal5i", 0)


def test_non_strict_lists_unexpected_and_headless_repri(canon):
    src, _, _ = build_layout("repri", canon)
    headless = {k: v for k, v in src.items() if not k.startswith("classifier.")}  # GFSS-Capstone's in-memory PSPNet
    wrapped = {f"encoder.pspnet.{k}": v for k, v in headless.items()}
    wrapped["mystery.weight"] = torch.zeros(3)
    model, report = convert_state_dict(wrapped, "pascal5i", 2, strict=False, source="gfss-capstone")
    assert report.unexpected == ["mystery.weight"]
    assert sorted(report.missing) == ["classifier.weight"]
    assert not model.config.classifier_bias
    assert (model.config.image_size, model.config.pad_mode) == (473, "mean")
    assert "unexpected" in report.summary()


def test_capl_prototype_classifier_keeps_the_cosine_argmax(canon):
    src, _, _ = build_layout("capl", canon)
    model, report = convert_state_dict(src, "pascal5i", 0, capl_prototype_classifier=True)
    split = get_split("pascal5i", 0)
    assert model.config.class_names == ["background", *split.base_names, *split.novel_names]
    assert model.config.classifier_bias and "classifier.weight" in report.derived and report.missing == []
    features = torch.relu(torch.randn(4, 512, 5, 5, generator=torch.Generator().manual_seed(0)))
    proj = F.conv2d(features, src["cls.4.weight"], src["cls.4.bias"])
    cosine = 10 * torch.einsum("bchw,kc->bkhw", F.normalize(proj, dim=1), F.normalize(src["main_proto"], dim=1))
    with torch.no_grad():
        ours = model.classifier(features)
    assert torch.equal(ours.argmax(1), cosine.argmax(1))
    with pytest.raises(ValueError, match="layout 'capl' only"):
        convert_state_dict(build_layout("repri", canon)[0], "pascal5i", 0, capl_prototype_classifier=True)


def test_expanding_a_biased_converted_classifier_keeps_base_logits(canon):
    src, _, _ = build_layout("repri", canon)
    model, _ = convert_state_dict(src, "pascal5i", 0)
    features = torch.randn(1, 512, 3, 3)
    with torch.no_grad():
        before = model.classifier(features)
        model.expand_classifier(["aeroplane", "bicycle"])
        after = model.classifier(features)
    assert torch.equal(after[:, :16], before)
    assert torch.equal(model.classifier.bias[16:], torch.zeros(2))


# ------------------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------------------
def test_read_legacy_safetensors_and_unsafe_pickle(tmp_path):
    state = {"module.layer0.0.weight": torch.randn(2, 3), "module.layer1.0.conv1.weight": torch.randn(4)}
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)  # POP's optional format
    with open(legacy, "rb") as handle:
        assert not handle.read(4).startswith(b"PK")  # really not a zip archive
    loaded = read_checkpoint(legacy)
    assert set(loaded) == {"layer0.0.weight", "layer1.0.conv1.weight"}
    assert torch.equal(loaded["layer0.0.weight"], state["module.layer0.0.weight"])

    from safetensors.torch import save_file

    save_file({k[len("module.") :]: v for k, v in state.items()}, tmp_path / "w.safetensors")
    assert torch.equal(
        read_checkpoint(tmp_path / "w.safetensors")["layer1.0.conv1.weight"], state["module.layer1.0.conv1.weight"]
    )

    import numpy as np

    pickled = tmp_path / "numpy.pth"
    torch.save({"state_dict": state, "best_miou": np.float64(0.5)}, pickled)
    with pytest.raises(ValueError, match="allow_unsafe_pickle"):
        read_checkpoint(pickled)
    assert set(read_checkpoint(pickled, allow_unsafe_pickle=True)) == {"layer0.0.weight", "layer1.0.conv1.weight"}
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


def _saved(obj, legacy=False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


_STATE = {"module.layer0.0.weight": torch.randn(64, 3, 3, 3), "module.layer1.0.conv1.weight": torch.randn(4, 4)}


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty \\(0 bytes\\).*incomplete download"),
        (_saved(_STATE)[:-200], "truncated or corrupt.*incomplete download"),
        (_saved(_STATE)[: len(_saved(_STATE)) // 2], "truncated or corrupt.*incomplete download"),
        (_saved(_STATE, legacy=True)[:-200], "truncated or corrupt.*incomplete download"),
        (b"<!DOCTYPE html><html>404 Not Found</html>", "not a PyTorch checkpoint"),
    ],
    ids=["empty", "zip-tail-cut", "zip-half", "legacy-pickle-cut", "html-page"],
)
@pytest.mark.parametrize("allow_unsafe_pickle", [False, True])
def test_corrupt_checkpoint_files_are_not_blamed_on_pickling(tmp_path, content, match, allow_unsafe_pickle):
    path = tmp_path / "best.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    assert "allow_unsafe_pickle" not in str(err.value)


@pytest.mark.parametrize("image_size", [0, -1, 4, 2.5])
def test_image_size_override_must_be_usable(canon, image_size):
    src, _, _ = build_layout("imagenet-semseg", canon)
    with pytest.raises(ValueError, match=f"image_size={image_size}"):
        convert_state_dict(src, image_size=image_size)


def test_unwrap_checkpoint_containers():
    t = torch.ones(1)
    assert unwrap_checkpoint({"model": {"module.a": t}, "epoch": 3}) == {"a": t}
    assert unwrap_checkpoint({"state_dict": {"pspnet.b": t}}) == {"b": t}
    assert unwrap_checkpoint(nn.Linear(1, 1)).keys() == {"weight", "bias"}
    with pytest.raises(ValueError, match="'a'"):
        unwrap_checkpoint({"module.a": t, "a": t})
    with pytest.raises(ValueError, match="no tensors"):
        unwrap_checkpoint({"epoch": 1})


def test_convert_checkpoint_and_save_atomically(tmp_path, canon, umask_027):
    src, _, _ = build_layout("imagenet-semseg", canon)
    buffer = io.BytesIO()
    torch.save(src, buffer)
    path = tmp_path / "resnet50_v2.pth"
    path.write_bytes(buffer.getvalue())
    model, report = convert_checkpoint(path)  # ImageNet backbones need no fold
    assert isinstance(report, ConversionReport) and report.layout == "imagenet-semseg"
    assert report.checkpoint == "resnet50_v2.pth" and len(report.checkpoint_sha256) == 64
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_converted(model, report, out)
    save_converted(model, report, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "conversion_report.json"} <= {
        p.name for p in out.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left
    # The folder is renamed from a mkdtemp (0700) folder: it gets the mode of a plain mkdir under the umask.
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert set(modes.values()) == {"0o640"}, modes
    card = (out / "README.md").read_text()
    assert "license: mit" in card and "hszhao/semseg" in card and "fc.* (2)" in card


def test_load_backbone_weights_points_pspnet_checkpoints_to_the_converter(tmp_path):
    from gfss_hf import GFSSConfig, GFSSModel

    model = GFSSModel(GFSSConfig(backbone="test_resnet", hidden_size=8, image_size=64, use_projection=False))
    torch.save({"state_dict": {"module.layer0.0.weight": torch.zeros(64, 3, 3, 3)}}, tmp_path / "best.pth")
    with pytest.raises(ValueError, match="convert_checkpoint"):
        load_backbone_weights(model, tmp_path / "best.pth")
