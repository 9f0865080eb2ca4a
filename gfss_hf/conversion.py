"""Convert the ResNet-50 PSPNet checkpoints released by the few-shot segmentation literature (semseg, PFENet, RePRI,
CWT, BAM, DIaM, BCM, CAPL, POP) and deep-stem ImageNet backbones into a [`GFSSModel`].

Every layout is renamed by an explicit table of `(source prefix, target prefix)` rules applied once to each original
key (never chained: the flat-stem rule maps `bn1 -> conv1.1` and `bn3 -> bn1`, so chained renames would collide).
Every tensor is shape-checked; every source key is either mapped or dropped for a stated reason; every target tensor
is either filled or reported as left at initialisation. Dilation is not stored in a state dict, so the layout decides
it: every PSPNet checkpoint here dilates the first block of layer3/layer4 (`dilation_style="pspnet"`).

Example:

```python
>>> from gfss_hf.conversion import convert_checkpoint, save_converted
>>> model, report = convert_checkpoint("best.pth", dataset="pascal5i", fold=0)  # doctest: +SKIP
>>> print(report.summary())  # doctest: +SKIP
>>> save_converted(model, report, "pspnet-repri-pascal5i-fold0")  # doctest: +SKIP
```
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import struct
import zipfile
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ._io import apply_umask, atomic_folder
from .configuration_gfss import GFSSConfig
from .image_processing_gfss import MIN_IMAGE_SIZE, GFSSImageProcessor
from .modeling_gfss import GFSSModel, create_backbone

__all__ = [
    "LAYOUTS",
    "SOURCES",
    "backbone_normalization",
    "fetch_backbone_weights",
    "timm_pretrained_cfg",
    "ConversionReport",
    "SourceInfo",
    "build_model_card",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "load_backbone_weights",
    "read_checkpoint",
    "save_converted",
    "unwrap_checkpoint",
]

logger = logging.get_logger(__name__)

# Detection order of CHECKPOINTS.md section 9: the first matching row wins.
LAYOUTS: tuple[str, ...] = (
    "capl",
    "pop",
    "bam-full",
    "pfenet",
    "bam",
    "semseg",
    "repri",
    "imagenet-semseg",
    "imagenet-timm",
)
_IMAGENET_LAYOUTS = ("imagenet-semseg", "imagenet-timm")
_NUM_PPM_STAGES = 4  # every source uses bins (1, 2, 3, 6)
_POOL_SCALES = (1, 2, 3, 6)
_BACKBONE = "resnet50s"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".npz")


# --------------------------------------------------------------------------------------------------------------------
# Provenance: where each layout comes from, its licence and its test-time geometry (CHECKPOINTS.md sections 0 and 7).
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceInfo:
    """
    A repository that released checkpoints, as recorded in converted model cards.

    Args:
        name (`str`): short name (`--source` of the conversion script).
        repo (`str`): GitHub `owner/name` (or Hub id for timm weights).
        commit (`str`): the revision whose model code the key tables were checked against.
        license (`str`): Hub licence id (`"other"` when the repository states none).
        license_note (`str`): the licence in words.
        layouts (`tuple[str]`): layouts this source produces.
        image_size (`int`, *optional*): long side / canvas of the source's evaluation; `None` keeps our default.
        pad_mode (`str`, *optional*): `"zero"` (black canvas) or `"mean"` (mean colour); `None` keeps our default.
        geometry_note (`str`, *optional*): how the source's evaluation differs from one `GFSSImageProcessor` canvas.
    """

    name: str
    repo: str
    commit: str
    license: str
    license_note: str
    layouts: tuple[str, ...]
    image_size: int | None
    pad_mode: str | None
    geometry_note: str | None = None


_FLOOR8 = (
    "the source resizes the long side to image_size floored to a multiple of 8; GFSSImageProcessor resizes it to "
    "image_size exactly, so test inputs differ slightly in scale"
)
_SEMSEG_GEOMETRY = (
    "semseg evaluates with the long side at 512, sliding 473x473 crops and flip averaging; the converted model uses one "
    "473 canvas"
)
_NONE_STATED = "none stated by the authors"
SOURCES: dict[str, SourceInfo] = {
    s.name: s
    for s in (
        SourceInfo(
            "semseg",
            "hszhao/semseg",
            "4f274c3f",
            "mit",
            "MIT",
            ("semseg", "imagenet-semseg"),
            473,
            "mean",
            _SEMSEG_GEOMETRY,
        ),
        SourceInfo(
            "pfenet", "dvlab-research/PFENet", "a5056754", "other", _NONE_STATED, ("pfenet",), 473, "zero", _FLOOR8
        ),
        SourceInfo(
            "repri",
            "mboudiaf/RePRI-for-Few-Shot-Segmentation",
            "aa54b19b",
            "mit",
            "MIT",
            ("repri",),
            417,
            "zero",
            _FLOOR8,
        ),
        SourceInfo("cwt", "zhiheLu/CWT-for-FSS", "3c396bac", "gpl-3.0", "GPL-3.0", ("repri",), 473, "zero", _FLOOR8),
        SourceInfo("diam", "sinahmr/DIaM", "a61e1ed5", "mit", "MIT", ("repri",), 417, "zero", _FLOOR8),
        SourceInfo("bcm", "IBM/BCM", "63c782cc", "mit", "MIT", ("repri",), 417, "zero", _FLOOR8),
        SourceInfo(
            "gfss-capstone", "hmdliu/GFSS-Capstone", "6d0571d9", "mit", "MIT", ("repri",), 473, "mean", _FLOOR8
        ),
        SourceInfo("bam", "chunbolang/BAM", "c0f935c3", "mit", "MIT", ("bam", "bam-full"), 417, "zero", _FLOOR8),
        SourceInfo(
            "capl", "dvlab-research/GFS-Seg", "c5bb735d", "other", _NONE_STATED, ("capl",), 473, "zero", _FLOOR8
        ),
        SourceInfo("pop", "lsa1997/POP", "3bc375cf", "mit", "MIT", ("pop",), 473, "mean"),
        SourceInfo(
            "timm", "timm/resnet50s.gluon_in1k", "hub", "apache-2.0", "Apache-2.0", ("imagenet-timm",), None, None
        ),
    )
}
_DEFAULT_SOURCE = {
    "capl": "capl",
    "pop": "pop",
    "bam-full": "bam",
    "pfenet": "pfenet",
    "bam": "bam",
    "semseg": "semseg",
    "repri": "repri",
    "imagenet-semseg": "semseg",
    "imagenet-timm": "timm",
}


# --------------------------------------------------------------------------------------------------------------------
# Key tables. Each rule is (source prefix, target prefix); a key is renamed by the first rule whose source prefix
# starts it, once, from the original key. Prefixes end with "." so that `layer1.0.conv1` never matches `conv1.`.
# --------------------------------------------------------------------------------------------------------------------
_LAYERS = tuple((f"layer{i}.", f"backbone.layer{i}.") for i in range(1, 5))

# Rule S: the semseg-family `layer0` Sequential stem (0 conv, 1 bn, 3 conv, 4 bn, 6 conv, 7 bn; the rest have no
# parameters) -> timm's deep stem, whose last BN sits outside the `conv1` Sequential.
_RULE_S = (
    ("layer0.0.", "backbone.conv1.0."),
    ("layer0.1.", "backbone.conv1.1."),
    ("layer0.3.", "backbone.conv1.3."),
    ("layer0.4.", "backbone.conv1.4."),
    ("layer0.6.", "backbone.conv1.6."),
    ("layer0.7.", "backbone.bn1."),
    *_LAYERS,
)
# Flat deep stem (semseg's ImageNet `resnet50_v2.pth`) -> timm deep stem. Applied in one pass from the original key.
_FLAT_STEM_TO_TIMM = {
    "conv1.": "conv1.0.",
    "bn1.": "conv1.1.",
    "conv2.": "conv1.3.",
    "bn2.": "conv1.4.",
    "conv3.": "conv1.6.",
    "bn3.": "bn1.",
}
# Rule F: the flat deep stem (`conv1/bn1/conv2/bn2/conv3/bn3`) of semseg's ImageNet file and of POP's backbone.
_RULE_F = (*((src, f"backbone.{dst}") for src, dst in _FLAT_STEM_TO_TIMM.items()), *_LAYERS)
# timm's own deep stem: identity.
_RULE_T = (("conv1.", "backbone.conv1."), ("bn1.", "backbone.bn1."), *_LAYERS)


def _ppm_rules(source_prefix: str) -> tuple[tuple[str, str], ...]:
    # Stage i pools to bin (1, 2, 3, 6)[i] in every source and in GFSSPyramidPooling; .0 pool and .3 ReLU are empty.
    return tuple(
        (f"{source_prefix}{i}.{part}.", f"decoder.stages.{i}.{part}.")
        for i in range(_NUM_PPM_STAGES)
        for part in (1, 2)
    )


def _head_rules(bottleneck_conv: str, bottleneck_bn: str, classifier: str | None) -> tuple[tuple[str, str], ...]:
    rules = ((bottleneck_conv, "decoder.bottleneck.0."), (bottleneck_bn, "decoder.bottleneck.1."))
    return rules + (((classifier, "classifier."),) if classifier else ())


@dataclass(frozen=True)
class _LayoutSpec:
    rename: tuple[tuple[str, str], ...]
    drop: tuple[tuple[str, str], ...] = ()  # (source prefix, reason)
    complete: tuple[str, ...] = ("backbone.", "decoder.")  # target groups that must be filled entirely
    dilation_style: str = "pspnet"
    ppm_align_corners: bool = True
    has_classifier: bool = True
    twins: tuple[tuple[str, str], ...] = ()  # (duplicate prefix, original prefix): equal copies, dropped
    notes: tuple[str, ...] = ()


_META_PFENET = "PFENet meta-learner (prior-guided feature enrichment): no counterpart in GFSSModel"
_META_BAM = "BAM meta learner / ensemble modules: no counterpart in GFSSModel"
_CAPL_HEAD = "CAPL cosine-prototype head (not a linear classifier): fit the classifier instead"
_POP_HEAD = "POP projection / prototype / scorer head (not a linear classifier): fit the classifier instead"

_LAYOUT_SPECS: dict[str, _LayoutSpec] = {
    "capl": _LayoutSpec(
        rename=(*_RULE_S, *_ppm_rules("ppm.features."), *_head_rules("cls.0.", "cls.1.", None)),
        drop=(
            ("cls.4.", _CAPL_HEAD),
            ("main_proto", _CAPL_HEAD),
            ("aux_proto", "CAPL auxiliary prototypes (training only)"),
            ("aux.", "auxiliary head on layer3 (training only)"),
            ("gamma_conv.", "CAPL context-aware prototype weighting: no counterpart"),
        ),
        has_classifier=False,
        notes=(
            "CAPL classifies by cosine similarity (x10) to prototypes after a 512->512 projection; GFSSModel's linear "
            "classifier cannot express it. Backbone, pyramid pooling and bottleneck are exact; the classifier is left "
            "at initialisation: fit it by base training or few-shot adaptation (or convert with "
            "capl_prototype_classifier=True for a lossy prototype initialisation).",
        ),
    ),
    "pop": _LayoutSpec(
        rename=(
            *(("backbone." + src, dst) for src, dst in _RULE_F),
            *_ppm_rules("decoder.stages."),
            *_head_rules("decoder.bottleneck.0.", "decoder.bottleneck.1.", None),
        ),
        drop=(
            ("decoder.bottleneck.3.", "POP 1x1 projection after the bottleneck ReLU: no counterpart"),
            ("base_emb", _POP_HEAD),
            ("novel_emb", _POP_HEAD),
            ("classifier_n.", _POP_HEAD),
            ("classifier.", _POP_HEAD),
            ("aux_classifier.", "auxiliary head (training only)"),
        ),
        ppm_align_corners=False,
        has_classifier=False,
        notes=(
            "POP scores pixels with orthogonal prototypes and an MLP; GFSSModel's linear classifier cannot express it. "
            "Backbone, pyramid pooling and bottleneck conv/bn are exact (bottleneck input channels permuted from "
            "POP's [stages, layer4] to our [layer4, stages]; ppm_align_corners=False as in POP). POP's 1x1 projection "
            "after the bottleneck is dropped, so the features are POP's pre-projection features. The classifier is "
            "left at initialisation: fit it by base training or few-shot adaptation.",
        ),
    ),
    "bam-full": _LayoutSpec(
        rename=(
            *_RULE_S,
            *_ppm_rules("learner_base.0.features."),
            *_head_rules("learner_base.1.0.", "learner_base.1.1.", "learner_base.1.4."),
        ),
        drop=tuple(
            (prefix, _META_BAM)
            for prefix in (
                "down_query.",
                "down_supp.",
                "init_merge.",
                "ASPP_meta.",
                "res1_meta.",
                "res2_meta.",
                "cls_meta.",
                "gram_merge.",
                "cls_merge.",
            )
        ),
        notes=(
            "BAM full (meta-trained) model: its base learner was frozen but ran in train() mode during meta-training, "
            "so the BatchNorm running statistics drifted. Prefer BAM's base-learner files (layout 'bam').",
        ),
    ),
    "pfenet": _LayoutSpec(
        rename=_RULE_S,
        drop=tuple(
            (prefix, _META_PFENET)
            for prefix in (
                "down_query.",
                "down_supp.",
                "init_merge.",
                "beta_conv.",
                "inner_cls.",
                "res1.",
                "res2.",
                "alpha_conv.",
                "cls.",
            )
        ),
        complete=("backbone.",),
        has_classifier=False,
        notes=(
            "PFENet checkpoints hold a backbone only (no pyramid pooling, no segmentation head): the decoder and the "
            "classifier are left at initialisation.",
            "PFENet froze the ImageNet backbone but kept BatchNorm in train mode during meta-training, so the running "
            "statistics drifted: treat these weights as an ImageNet-like initialisation.",
        ),
    ),
    "bam": _LayoutSpec(
        rename=(*_RULE_S, *_ppm_rules("ppm.features."), *_head_rules("cls.0.", "cls.1.", "cls.4.")),
        twins=tuple((f"encoder.{i}.", f"layer{i}.") for i in range(5)),
        notes=("BAM base learners were trained with novel-class pixels labelled background (0), not ignored.",),
    ),
    "semseg": _LayoutSpec(
        rename=(*_RULE_S, *_ppm_rules("ppm.features."), *_head_rules("cls.0.", "cls.1.", "cls.4.")),
        drop=(("aux.", "auxiliary head on layer3 (training only)"),),
    ),
    "repri": _LayoutSpec(
        rename=(
            *_RULE_S,
            *_ppm_rules("ppm.features."),
            *_head_rules("bottleneck.0.", "bottleneck.1.", "classifier."),
        ),
    ),
    "imagenet-semseg": _LayoutSpec(
        rename=_RULE_F,
        drop=(("fc.", "ImageNet classification head"),),
        complete=("backbone.",),
        dilation_style="timm",
        has_classifier=False,
        notes=("ImageNet backbone only: the decoder and the classifier are left at initialisation.",),
    ),
    "imagenet-timm": _LayoutSpec(
        rename=_RULE_T,
        drop=(("fc.", "ImageNet classification head"),),
        complete=("backbone.",),
        dilation_style="timm",
        has_classifier=False,
        notes=("ImageNet backbone only: the decoder and the classifier are left at initialisation.",),
    ),
}

_PREFIXES_TO_STRIP = ("encoder.pspnet.", "pspnet.")  # GFSS-Capstone's in-memory wrapper (CHECKPOINTS.md 4.G)


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ConversionReport:
    """
    What a conversion did, tensor by tensor.

    Args:
        layout (`str`): the layout converted (one of `LAYOUTS`).
        source (`str`): key of `SOURCES` (the repository the file comes from).
        checkpoint (`str`, *optional*): the file name.
        checkpoint_sha256 (`str`, *optional*): SHA-256 of the file.
        mapped (`dict[str, str]`): source key -> target key of every copied tensor.
        dropped (`dict[str, str]`): source key -> reason, for tensors with no counterpart.
        missing (`list[str]`): target keys left at initialisation (never silently: they are listed here).
        unexpected (`list[str]`): source keys neither mapped nor in the layout's drop list (only with
            `strict=False`; a strict conversion refuses them).
        derived (`dict[str, str]`): target key -> how it was computed from several source tensors (lossy).
        notes (`list[str]`): caveats (lossy parts, BatchNorm drift, ...).
        config (`dict`): the conversion-relevant config values.
    """

    layout: str
    source: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    derived: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def source_info(self) -> SourceInfo:
        return SOURCES[self.source]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A readable multi-line summary: counts per module, dropped groups with their reasons, caveats."""
        info = self.source_info
        lines = [
            f"layout {self.layout!r} from {info.repo} (licence: {info.license_note})"
            + (f", file {self.checkpoint}" if self.checkpoint else ""),
        ]
        groups = Counter(target.split(".")[0] for target in self.mapped.values())
        detail = ", ".join(f"{name} {count}" for name, count in sorted(groups.items()))
        lines.append(f"  mapped     {len(self.mapped):4d} tensors" + (f" ({detail})" if detail else ""))
        if self.derived:
            for target, how in self.derived.items():
                lines.append(f"  derived    {target}: {how}")
        lines.append(f"  dropped    {len(self.dropped):4d} tensors")
        by_group: dict[tuple[str, str], int] = Counter()
        for key, reason in self.dropped.items():
            by_group[(_group_name(key), reason)] += 1
        for (group, reason), count in by_group.items():
            lines.append(f"    {group}* ({count}): {reason}")
        lines.append(f"  missing    {len(self.missing):4d} target tensors left at initialisation")
        for group, count in Counter(_group_name(key) for key in self.missing).items():
            lines.append(f"    {group}* ({count})")
        if self.unexpected:
            lines.append(f"  unexpected {len(self.unexpected):4d} source tensors ignored (strict=False)")
            for group, count in Counter(_group_name(key) for key in self.unexpected).items():
                lines.append(f"    {group}* ({count})")
        if self.config:
            lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in self.config.items()))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


def _group_name(key: str) -> str:
    parts = key.split(".")
    # Two levels are informative for wrapped heads (decoder.stages, learner_base.1); one for the rest.
    depth = 2 if parts[0] in ("decoder", "learner_base", "backbone") and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + "."


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """
    Read a checkpoint file and return its unwrapped state dict (see [`unwrap_checkpoint`]).

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`, which also
    reads the legacy non-zip format. Files that need arbitrary unpickling (old pickles with numpy scalars) are refused
    unless `allow_unsafe_pickle=True`: unpickling can run code, so only do that for files you trust.

    Args:
        path (`str` or `os.PathLike`): the checkpoint (`.pth`, `.pt`, `.tar`, `.bin`, `.safetensors`).
        allow_unsafe_pickle (`bool`, *optional*, defaults to `False`): retry with `weights_only=False` when the safe
            loader fails.

    Returns:
        `dict[str, torch.Tensor]`: the flat state dict, `module.` / `pspnet.` prefixes removed.

    Example:

    ```python
    >>> state_dict = read_checkpoint("model_ckpt/pascal/split0/pspnet_resnet50/best.pth")  # doctest: +SKIP
    ```
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist; give the path of a .pth or .safetensors file.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return unwrap_checkpoint(load_file(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        _raise_if_damaged(path, err)
        if not allow_unsafe_pickle:
            raise ValueError(
                f"{path!r} could not be read with torch.load(weights_only=True): {err}. The file holds objects other "
                "than tensors and plain containers. If you trust its origin, pass allow_unsafe_pickle=True "
                "(--allow_unsafe_pickle), which unpickles it with weights_only=False and can run code from the file."
            ) from err
        logger.warning(
            f"{path!r} needs full unpickling (weights_only=False), which can execute code stored in the file; "
            "continuing because allow_unsafe_pickle=True."
        )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as unsafe_err:
            # A legacy pickle that needs globals fails on them before reaching a cut-off end.
            _raise_if_damaged(path, unsafe_err)
            raise
    return unwrap_checkpoint(obj)


# What unpickling a cut-off stream raises (the legacy format is pickles followed by raw storage bytes).
_TRUNCATION_ERRORS = (EOFError, struct.error)
_TRUNCATION_WORDS = ("truncated", "unexpected eof", "ran out of input", "might be corrupted")


def _damage(path: str, err: BaseException) -> str | None:
    """Why `path` is a damaged file rather than a checkpoint needing full unpickling, or None when it looks intact:
    judged from the file's structure (size, zip directory and CRCs, pickle header) and, for legacy pickles, from
    the failure being a cut-off stream."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes)"
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):  # torch.save's zip format
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as zip_err:
            return f"is a truncated or corrupt zip archive ({size} bytes; {zip_err})"
        return None if bad is None else f"is a truncated or corrupt zip archive (member {bad!r} fails its CRC check)"
    if head[:1] == b"\x80":  # a pickle (protocol >= 2): torch's legacy format
        chain, seen = [], err
        while seen is not None and len(chain) < 8:
            chain.append(seen)
            seen = seen.__cause__ or seen.__context__
        truncated = (
            isinstance(e, _TRUNCATION_ERRORS) or any(w in str(e).lower() for w in _TRUNCATION_WORDS) for e in chain
        )
        if any(truncated):
            return f"is a truncated or corrupt legacy (pickle) checkpoint ({size} bytes; {err})"
        return None
    return (
        f"is not a PyTorch checkpoint: it starts with {head!r}, neither a zip archive (torch.save) nor a pickle "
        "(legacy torch.save); a failed download often saves an HTML error page instead"
    )


def _raise_if_damaged(path: str, err: BaseException) -> None:
    reason = _damage(path, err)
    if reason is not None:
        raise ValueError(
            f"checkpoint {path!r} {reason}. This is an incomplete download or a corrupt copy, not a file that needs "
            "unpickling (allowing unsafe unpickling would not help): download it again and compare its size or sha256 "
            "with the source's."
        ) from err


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """
    Unwrap a loaded checkpoint into a flat state dict.

    Uses `obj["state_dict"]` if present, else `obj["model"]`, else `obj` itself (a module gives its `state_dict()`);
    keeps tensor values only (top-level `epoch`, `optimizer`, ... are ignored); strips a leading `module.`
    (DataParallel / DDP saves) and GFSS-Capstone's `pspnet.` / `encoder.pspnet.` wrappers. Idempotent.

    Args:
        obj (`Mapping` or `nn.Module`): what `torch.load` returned.

    Returns:
        `dict[str, torch.Tensor]`
    """
    if isinstance(obj, Mapping):
        for container in ("state_dict", "model"):
            inner = obj.get(container)
            if isinstance(inner, (Mapping, nn.Module)):
                obj = inner
                break
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValueError(f"the checkpoint holds a {type(obj).__name__}, not a state dict; save model.state_dict().")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        new_key = str(key)
        if new_key.startswith("module."):
            new_key = new_key[len("module.") :]
        for prefix in _PREFIXES_TO_STRIP:
            if new_key.startswith(prefix):
                new_key = new_key[len(prefix) :]
                break
        if new_key in out:
            raise ValueError(
                f"two checkpoint keys map to {new_key!r} after removing 'module.'/'pspnet.' prefixes (one of them is "
                f"{key!r}); the file mixes wrapped and unwrapped copies of the model: keep one."
            )
        out[new_key] = value
    if not out:
        raise ValueError("the checkpoint holds no tensors; is it a model checkpoint (state_dict) at all?")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------------------------------
def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    value = state_dict.get(key)
    return tuple(value.shape) if value is not None else None


def _precheck(sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse ResNet-101 (and deeper) and VGG files before any layout row is tried (CHECKPOINTS.md section 9)."""
    for key in ("layer3.6.conv1.weight", "backbone.layer3.6.conv1.weight"):
        if key in sd:
            raise ValueError(
                f"this checkpoint has a ResNet-101 (or deeper) backbone: it holds {key!r}, and ResNet-50 has blocks "
                "layer3.0-5 only. gfss_hf converts ResNet-50 checkpoints (backbone resnet50s); use the ResNet-50 file "
                "of the same release."
            )
    if "layer0.0.bias" in sd or not ("layer1.0.conv1.weight" in sd or "backbone.layer1.0.conv1.weight" in sd):
        reason = (
            "it holds 'layer0.0.bias' (the VGG-16-bn first conv has a bias, the ResNet stem has none)"
            if "layer0.0.bias" in sd
            else "it has no 'layer1.0.conv1.weight' (no ResNet bottleneck blocks)"
        )
        raise ValueError(
            f"this checkpoint does not have a ResNet backbone: {reason}. VGG-16-bn checkpoints (the VGG variants of "
            "PFENet, BAM, RePRI, CWT) cannot be converted: GFSSModel uses a ResNet-50 backbone. Use the ResNet-50 file "
            "of the same release."
        )


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """
    Identify the checkpoint layout from its key names and shapes (CHECKPOINTS.md section 9, first match wins).

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): a state dict (wrappers and `module.` prefixes are removed first).

    Returns:
        `str`: one of `LAYOUTS`.

    Raises:
        `ValueError`: for ResNet-101, VGG, plain 7x7-stem and 32-wide-stem files, and for unknown layouts, with the
        reason and what to do.

    Example:

    ```python
    >>> detect_layout(read_checkpoint("best.pth"))  # doctest: +SKIP
    'repri'
    ```
    """
    sd = unwrap_checkpoint(state_dict)
    _precheck(sd)
    shape = lambda key: _shape(sd, key)  # noqa: E731
    cls4 = shape("cls.4.weight")
    if "main_proto" in sd and "gamma_conv.0.weight" in sd and cls4 is not None and cls4[:2] == (512, 512):
        return "capl"
    if shape("backbone.conv3.weight") == (128, 64, 3, 3) and "decoder.stages.0.1.weight" in sd:
        return "pop"
    if shape("learner_base.1.0.weight") is not None and shape("learner_base.1.0.weight")[1:] == (4096, 3, 3):
        return "bam-full"
    if "layer0.0.weight" in sd and "down_query.0.weight" in sd and "init_merge.0.0.weight" in sd:
        return "pfenet"
    cls4_is_classifier = cls4 is not None and len(cls4) == 4 and cls4[1:] == (512, 1, 1)
    if "encoder.0.0.weight" in sd and cls4_is_classifier:
        return "bam"
    if "layer0.0.weight" in sd and cls4_is_classifier and shape("aux.0.weight") == (256, 1024, 3, 3):
        return "semseg"
    bottleneck = shape("bottleneck.0.weight")
    if "layer0.0.weight" in sd and bottleneck is not None and bottleneck[1:] == (4096, 3, 3):
        return "repri"
    if shape("conv1.weight") == (64, 3, 3, 3) and shape("conv3.weight") == (128, 64, 3, 3):
        return "imagenet-semseg"
    if (
        shape("conv1.0.weight") == (64, 3, 3, 3)
        and shape("conv1.6.weight") == (128, 64, 3, 3)
        and shape("bn1.weight") == (128,)
    ):
        return "imagenet-timm"
    stem = shape("conv1.weight")
    if stem is not None and stem[-2:] == (7, 7):
        raise ValueError(
            f"this checkpoint has a single 7x7 stem conv (conv1.weight {stem}: torchvision / timm plain ResNet-50), "
            "which cannot be loaded into the 3-conv deep stem of resnet50s. Use deep-stem weights: timm "
            "resnet50s.gluon_in1k or semseg's resnet50_v2.pth."
        )
    deep = shape("conv1.0.weight")
    if deep is not None and deep[0] == 32:
        raise ValueError(
            f"this checkpoint has a 32-wide deep stem (conv1.0.weight {deep}: timm resnet50c / resnet50d), which does "
            "not fit the 64-64-128 stem of resnet50s. Use timm resnet50s.gluon_in1k or semseg's resnet50_v2.pth."
        )
    sample = sorted(sd)[:8]
    raise ValueError(
        f"could not recognise the layout of this checkpoint ({len(sd)} tensors, first keys {sample}). Known layouts: "
        f"{list(LAYOUTS)} (see CHECKPOINTS.md). If you know the layout, pass layout=... explicitly."
    )


# --------------------------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------------------------
def _match(key: str, rules: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    for src, dst in rules:
        if key.startswith(src):
            return src, dst
    return None


def _source_key_for(target_key: str, rules: Sequence[tuple[str, str]]) -> str:
    """The source key a target key would come from (for error messages)."""
    for src, dst in rules:
        if target_key.startswith(dst):
            return src + target_key[len(dst) :]
    return "(no source key)"


def _class_names(
    layout: str,
    num_rows: int | None,
    sd: Mapping[str, torch.Tensor],
    dataset: str | None,
    fold: int | None,
    split_kind: str | None,
    class_names: Sequence[str] | None,
    notes: list[str],
    with_novel: bool = False,
) -> tuple[str, tuple[str, ...], tuple[str, ...], str | None]:
    """Background name, base names and novel names of the classifier rows, and the split kind used.

    Novel rows exist only for CAPL's prototype classifier (`with_novel`): CAPL's prototypes cover bg, base, novel."""
    if class_names is not None:
        names = tuple(str(n) for n in class_names)
        if num_rows is not None and len(names) != num_rows:
            raise ValueError(
                f"class_names has {len(names)} names but the checkpoint classifier has {num_rows} rows; give one name "
                "per row, row 0 (background) first."
            )
        if len(names) < 1:
            raise ValueError("class_names is empty; give one name per classifier row, background first.")
        return names[0], names[1:], (), split_kind
    if dataset is None:
        if layout in _IMAGENET_LAYOUTS:
            return "background", (), (), split_kind
        raise ValueError(
            f"a {layout!r} checkpoint is trained on the base classes of one fold: pass dataset= and fold= (e.g. "
            "dataset='pascal5i', fold=0) so that the classifier rows get their class names, or class_names=[...]."
        )
    if fold is None:
        raise ValueError(f"dataset={dataset!r} needs a fold; pass fold=0..3 (0..1 for pascal10i).")
    from .data.splits import get_split

    split = get_split(dataset, fold, split_kind)
    base = split.base_names
    if num_rows is not None and num_rows != 1 + len(base):
        if num_rows == 1 + split.num_classes:
            notes.append(
                f"the classifier has {num_rows} rows = background + all {split.num_classes} classes of {dataset}: a "
                "full-dataset model, not a base learner. Every class is bound as a base class; do not use it to "
                "evaluate novel classes."
            )
            return "background", split.class_names, (), split.split_kind
        raise ValueError(
            f"the checkpoint classifier has {num_rows} rows but {dataset} fold {fold} ({split.split_kind}) has "
            f"1 + {len(base)} base classes = {1 + len(base)} rows; pass the dataset/fold the checkpoint was trained "
            "on (PASCAL-5i: 16 rows, PASCAL-10i: 11, COCO-20i: 61) or class_names=[...]."
        )
    # Prototype tables carry the row count of heads we do not map: still check the fold matches.
    if layout == "capl" and "main_proto" in sd:
        rows = sd["main_proto"].shape[0]
        if rows != 1 + len(base) + len(split.novel_ids):
            raise ValueError(
                f"main_proto has {rows} rows but {dataset} fold {fold} has 1 + {len(base)} base + "
                f"{len(split.novel_ids)} novel = {1 + len(base) + len(split.novel_ids)} classes; pass the dataset the "
                "CAPL checkpoint was trained on."
            )
    if layout == "pop" and "base_emb" in sd and sd["base_emb"].shape[0] != len(base):
        raise ValueError(
            f"base_emb has {sd['base_emb'].shape[0]} rows but {dataset} fold {fold} has {len(base)} base classes; "
            "pass the dataset the POP checkpoint was trained on."
        )
    return "background", base, split.novel_names if with_novel else (), split.split_kind


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    dataset: str | None = None,
    fold: int | None = None,
    layout: str = "auto",
    *,
    split_kind: str | None = None,
    source: str | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
    pad_mode: str | None = None,
    dilation_style: str | None = None,
    capl_prototype_classifier: bool = False,
    strict: bool = True,
    checkpoint_name: str | None = None,
) -> tuple[GFSSModel, ConversionReport]:
    """
    Convert a released PSPNet / ImageNet state dict into a [`GFSSModel`] (eval mode) and a [`ConversionReport`].

    Args:
        state_dict (`Mapping[str, torch.Tensor]`): the checkpoint (containers and `module.` prefixes are unwrapped).
        dataset (`str`, *optional*): `"pascal5i"`, `"pascal10i"`, `"coco20i"` (or `"synthetic"`): the fold table that
            names the classifier rows (background, then the fold's base classes in ascending id). Required for every
            layout except the ImageNet ones, unless `class_names` is given.
        fold (`int`, *optional*): the fold the checkpoint was trained on.
        layout (`str`, *optional*, defaults to `"auto"`): one of `LAYOUTS`, or `"auto"` to detect it.
        split_kind (`str`, *optional*): COCO-20i `"interleaved"` (default, used by every released file) or
            `"consecutive"`.
        source (`str`, *optional*): key of `SOURCES` (e.g. `"cwt"` for a CWT file in the `repri` layout); sets the
            licence in the card and the default input size / padding. Defaults to the layout's main repository.
        class_names (`Sequence[str]`, *optional*): one name per classifier row, background first (for full-dataset
            models such as semseg's ADE20K / Cityscapes ones).
        image_size (`int`, *optional*): overrides the source's evaluation size (CHECKPOINTS.md section 7).
        pad_mode (`str`, *optional*): overrides the source's canvas padding (`"zero"` or `"mean"`).
        dilation_style (`str`, *optional*): overrides the layout's dilation (`"pspnet"` for every PSPNet checkpoint,
            `"timm"` for ImageNet backbones). `"timm"` on a PSPNet checkpoint changes the function; it is flagged.
        capl_prototype_classifier (`bool`, *optional*, defaults to `False`): for CAPL, initialise a biased linear
            classifier (background, base, novel rows) from the projection and `main_proto`. Lossy (see the report).
        strict (`bool`, *optional*, defaults to `True`): refuse source tensors that are neither mapped nor in the
            layout's drop list; with `False` they are listed as `unexpected`.
        checkpoint_name (`str`, *optional*): file name recorded in the config and report.

    Returns:
        `tuple[GFSSModel, ConversionReport]`

    Example:

    ```python
    >>> model, report = convert_state_dict(torch.load("best.pth", weights_only=True), "pascal5i", 0)  # doctest: +SKIP
    >>> report.layout, model.config.dilation_style, model.config.image_size  # doctest: +SKIP
    ('repri', 'pspnet', 417)
    ```
    """
    # `image_size or default` would silently ignore 0; the processor needs a canvas of at least 8 px.
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < MIN_IMAGE_SIZE
    ):
        raise ValueError(
            f"image_size={image_size!r} is invalid: it must be an integer >= {MIN_IMAGE_SIZE} (the canvas side in "
            "pixels, e.g. 473 or 417); leave it unset to keep the source's evaluation size."
        )
    sd = unwrap_checkpoint(state_dict)
    _precheck(sd)
    if layout == "auto":
        layout = detect_layout(sd)
    elif layout not in _LAYOUT_SPECS:
        raise ValueError(f"layout={layout!r} is unknown; allowed: 'auto' or one of {list(LAYOUTS)}.")
    else:
        try:
            detected = detect_layout(sd)
        except ValueError:
            detected = None
        if detected != layout:
            logger.warning(f"converting as layout {layout!r} as requested, but the keys look like {detected!r}.")
    spec = _LAYOUT_SPECS[layout]
    source_given = source is not None
    source = source or _DEFAULT_SOURCE[layout]
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is unknown; allowed: {sorted(SOURCES)}.")
    info = SOURCES[source]
    if layout not in info.layouts:
        raise ValueError(
            f"source {source!r} ({info.repo}) releases layouts {list(info.layouts)}, not {layout!r}; pick the source "
            f"the file comes from (sources of {layout!r}: {[s for s, i in SOURCES.items() if layout in i.layouts]})."
        )
    notes = list(spec.notes)
    shared = [name for name, other in SOURCES.items() if layout in other.layouts]
    if len(shared) > 1 and not source_given:
        notes.append(
            f"the {layout!r} layout is released by several repositories ({', '.join(shared)}); recorded as {source!r}. "
            "Pass source=... (--source) so that the card carries the right licence and input geometry."
        )
    if info.geometry_note and layout not in _IMAGENET_LAYOUTS:
        notes.append(info.geometry_note + ".")
    if capl_prototype_classifier and layout != "capl":
        raise ValueError(f"capl_prototype_classifier=True applies to layout 'capl' only, not {layout!r}.")

    # 1. Partition the source keys, renaming each original key once.
    mapped: dict[str, tuple[str, torch.Tensor]] = {}  # target -> (source key, tensor)
    dropped: dict[str, str] = {}
    unexpected: list[str] = []
    for key in sorted(sd):
        twin = _match(key, spec.twins)
        if twin is not None:
            original = twin[1] + key[len(twin[0]) :]
            if original not in sd:
                raise ValueError(
                    f"{key!r} duplicates {original!r} in the {layout!r} layout, but {original!r} is missing; the file is "
                    "incomplete or not of this layout."
                )
            if sd[original].shape != sd[key].shape or not torch.equal(sd[original], sd[key]):
                raise ValueError(
                    f"{key!r} must be an identical copy of {original!r} in the {layout!r} layout (the same module "
                    "registered twice), but they differ; the file is not a plain BAM base learner."
                )
            dropped[key] = f"duplicate of {twin[1]}* (same module registered twice)"
            continue
        rule = _match(key, spec.rename)
        if rule is not None:
            target = rule[1] + key[len(rule[0]) :]
            mapped[target] = (key, sd[key])
            continue
        reason = next((why for prefix, why in spec.drop if key.startswith(prefix)), None)
        if reason is not None:
            dropped[key] = reason
        else:
            unexpected.append(key)
    if unexpected and strict:
        raise ValueError(
            f"{len(unexpected)} tensors of this {layout!r} checkpoint have no rule (first: {unexpected[:10]}); the file "
            "has modules the layout table does not know. Check the layout, or pass strict=False (--non_strict) to "
            "convert the known part and list the rest as unexpected."
        )

    # 2. The config: geometry and dilation from the source, classes from the fold table.
    classifier = mapped.get("classifier.weight")
    num_rows = classifier[1].shape[0] if classifier is not None else None
    background, base, novel, split_kind = _class_names(
        layout, num_rows, sd, dataset, fold, split_kind, class_names, notes, with_novel=capl_prototype_classifier
    )
    bottleneck = mapped.get("decoder.bottleneck.0.weight")
    hidden_size = bottleneck[1].shape[0] if bottleneck is not None else 512
    has_bias = "classifier.bias" in mapped or capl_prototype_classifier
    style = dilation_style or spec.dilation_style
    if style != spec.dilation_style and layout not in _IMAGENET_LAYOUTS:
        notes.append(
            f"dilation_style={style!r} differs from the checkpoint's 'pspnet' dilation: the converted model does NOT "
            "compute what the source computed."
        )
    config = GFSSConfig(
        backbone=_BACKBONE,
        output_stride=8,
        dilation_style=style,
        pool_scales=_POOL_SCALES,
        ppm_align_corners=spec.ppm_align_corners,
        hidden_size=hidden_size,
        classifier_bias=has_bias,
        logits_align_corners=True,  # every semseg-family repo upsamples logits with align_corners=True
        image_size=image_size or info.image_size or GFSSConfig.image_size,
        pad_mode=pad_mode or info.pad_mode or GFSSConfig.pad_mode,
        background_name=background,
        base_class_names=base,
        novel_class_names=novel,
        use_projection=layout in _IMAGENET_LAYOUTS,  # a converted head has no contrastive projection
        dataset=dataset,
        fold=fold,
        split_kind=split_kind,
        source_checkpoint=f"{layout}:{info.repo}@{info.commit}" + (f":{checkpoint_name}" if checkpoint_name else ""),
    )
    model = GFSSModel(config)
    target = model.state_dict()

    # 3. Shapes: every mapped tensor must fit its target exactly.
    new_state = dict(target)
    for target_key, (source_key, value) in mapped.items():
        if target_key not in target:
            raise ValueError(
                f"source tensor {source_key!r} {tuple(value.shape)} maps to {target_key!r}, which a {_BACKBONE} "
                f"GFSSModel does not have; the file is not a ResNet-50 {layout!r} checkpoint."
            )
        if layout == "pop" and target_key == "decoder.bottleneck.0.weight":
            value = _permute_pop_bottleneck(value, model.backbone.feature_info.channels()[-1])
        if tuple(value.shape) != tuple(target[target_key].shape):
            raise ValueError(
                f"shape mismatch: source tensor {source_key!r} has shape {tuple(value.shape)} but its target "
                f"{target_key!r} needs {tuple(target[target_key].shape)}; the file is not a ResNet-50 PSPNet of the "
                f"{layout!r} layout (or the classes/fold do not match)."
            )
        new_state[target_key] = value.detach().to(dtype=target[target_key].dtype).clone()

    # 4. Completeness: a group with any mapped tensor (and every group the layout guarantees) must be complete.
    filled_groups = {t.split(".")[0] + "." for t in mapped}
    required = set(spec.complete) | filled_groups
    missing = []
    for target_key, value in target.items():
        if target_key in mapped or target_key.endswith("num_batches_tracked"):
            continue  # absent num_batches_tracked (pre-0.4.1 files) keeps the target's value
        if target_key.startswith(tuple(required)):
            raise ValueError(
                f"missing tensor: the checkpoint has no {_source_key_for(target_key, spec.rename)!r} (expected shape "
                f"{tuple(value.shape)}) for {target_key!r}; the file is truncated or not of the {layout!r} layout."
            )
        missing.append(target_key)
    model.load_state_dict(new_state, strict=True)

    derived: dict[str, str] = {}
    if capl_prototype_classifier:
        derived = _capl_prototype_classifier(model, sd)
        missing = [k for k in missing if not k.startswith("classifier.")]
        notes.append(
            "classifier rows initialised from CAPL's prototypes: row c = W_proj^T n(proto_c), bias c = b_proj . "
            "n(proto_c). The argmax of CAPL's static cosine classifier is kept, but its logit scale (10/||f||) and its "
            "test-time context-aware prototype update (gamma_conv) are not: lossy."
        )
    if has_bias and not capl_prototype_classifier:
        notes.append("the source classifier has a bias: converted with classifier_bias=True (nothing dropped).")
    model.eval()

    report = ConversionReport(
        layout=layout,
        source=source,
        checkpoint=checkpoint_name,
        mapped={source_key: target_key for target_key, (source_key, _) in sorted(mapped.items())},
        dropped=dropped,
        missing=missing,
        unexpected=unexpected,
        derived=derived,
        notes=notes,
        config={
            "dilation_style": config.dilation_style,
            "ppm_align_corners": config.ppm_align_corners,
            "classifier_bias": config.classifier_bias,
            "image_size": config.image_size,
            "pad_mode": config.pad_mode,
            "num_labels": config.num_labels,
            "dataset": dataset,
            "fold": fold,
            "split_kind": split_kind,
        },
    )
    logger.info(f"converted checkpoint:\n{report.summary()}")
    return model, report


def _permute_pop_bottleneck(weight: torch.Tensor, backbone_channels: int) -> torch.Tensor:
    # POP concatenates [stage_0..stage_3, layer4]; GFSSPyramidPooling concatenates [layer4, stage_0..stage_3].
    stage_channels = weight.shape[1] - backbone_channels
    if stage_channels <= 0:
        raise ValueError(
            f"POP bottleneck weight has {weight.shape[1]} input channels, not more than the {backbone_channels} "
            "backbone channels; it is not a PSP bottleneck."
        )
    return torch.cat([weight[:, stage_channels:], weight[:, :stage_channels]], dim=1)


@torch.no_grad()
def _capl_prototype_classifier(model: GFSSModel, sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    # CAPL: logits_c = 10 * cos(W f + b, proto_c). For a pixel, |W f + b| is the same for every class, so
    # argmax_c cos(.) = argmax_c n(proto_c) . (W f + b): a linear classifier with a bias.
    for key in ("cls.4.weight", "cls.4.bias", "main_proto"):
        if key not in sd:
            raise ValueError(f"capl_prototype_classifier=True needs {key!r}, which the checkpoint lacks.")
    weight = sd["cls.4.weight"].double().flatten(1)  # (proj_out, hidden)
    bias = sd["cls.4.bias"].double()
    protos = F.normalize(sd["main_proto"].double(), dim=1)  # (rows, proj_out)
    rows = protos @ weight  # (rows, hidden)
    target = model.classifier
    if tuple(rows.shape) != (target.out_channels, target.in_channels):
        raise ValueError(
            f"CAPL prototypes give a ({rows.shape[0]}, {rows.shape[1]}) classifier but the model expects "
            f"({target.out_channels}, {target.in_channels}); check dataset and fold."
        )
    target.weight.copy_(rows.to(target.weight)[:, :, None, None])
    target.bias.copy_((protos @ bias).to(target.bias))
    how = "from cls.4.weight, cls.4.bias and main_proto (CAPL cosine head; argmax-preserving, lossy)"
    return {"classifier.weight": how, "classifier.bias": how}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(
    path: str | os.PathLike,
    dataset: str | None = None,
    fold: int | None = None,
    layout: str = "auto",
    *,
    allow_unsafe_pickle: bool = False,
    **kwargs,
) -> tuple[GFSSModel, ConversionReport]:
    """
    Read a checkpoint file and convert it (see [`read_checkpoint`] and [`convert_state_dict`]).

    Args:
        path (`str` or `os.PathLike`): the file.
        dataset (`str`, *optional*), fold (`int`, *optional*), layout (`str`, *optional*, defaults to `"auto"`):
            as in [`convert_state_dict`].
        allow_unsafe_pickle (`bool`, *optional*, defaults to `False`): see [`read_checkpoint`].
        **kwargs: the keyword arguments of [`convert_state_dict`].

    Returns:
        `tuple[GFSSModel, ConversionReport]` (the report records the file name and its SHA-256).

    Example:

    ```python
    >>> model, report = convert_checkpoint("model.pth", dataset="pascal5i", fold=0, source="diam")  # doctest: +SKIP
    ```
    """
    path = os.fspath(path)
    state_dict = read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    kwargs.setdefault("checkpoint_name", os.path.basename(path))
    model, report = convert_state_dict(state_dict, dataset, fold, layout, **kwargs)
    report.checkpoint_sha256 = _sha256(path)
    return model, report


# --------------------------------------------------------------------------------------------------------------------
# ImageNet backbone weights (pre-training starts from them)
# --------------------------------------------------------------------------------------------------------------------
def _imagenet_to_timm_keys(
    state_dict: dict[str, torch.Tensor], target_keys
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map an ImageNet ResNet state dict to the timm `features_only` keys of a backbone whose keys are `target_keys`.

    Same-layout files map by identity; the flat deep stem (semseg's `resnet50_v2.pth`) maps to timm's deep stem. A
    7x7 stem or a 32-wide deep stem offered to a 64-64-128 deep-stem backbone is refused with the reason. Returns the
    mapped dict and the list of dropped keys (the `fc` head)."""
    if any(key.startswith(("layer0.", "ppm.", "learner_base.", "backbone.layer1.")) for key in state_dict):
        # A segmentation checkpoint would otherwise fail with hundreds of missing/unexpected keys.
        raise ValueError(
            "this file is a PSPNet segmentation checkpoint (semseg / PFENet / RePRI / BAM / CAPL / POP layout), not "
            "ImageNet backbone weights; convert it with gfss_hf.conversion.convert_checkpoint or "
            "scripts/convert_checkpoint.py."
        )
    target_keys = set(target_keys)
    target_deep = "conv1.0.weight" in target_keys
    stem = state_dict.get("conv1.weight")
    if target_deep and stem is not None and stem.shape[-1] == 7:
        raise ValueError(
            "this file has a single 7x7 stem conv (torchvision / timm plain ResNet-50), which cannot be loaded into "
            "the 3-conv deep stem of resnet50s; use deep-stem weights (timm resnet50s.gluon_in1k or semseg's "
            "resnet50_v2.pth)."
        )
    deep = state_dict.get("conv1.0.weight")
    if target_deep and deep is not None and deep.shape[0] == 32:
        raise ValueError(
            "this file has a 32-wide deep stem (timm resnet50c/resnet50d), which does not fit resnet50s's 64-64-128 "
            "stem; use resnet50s.gluon_in1k or semseg's resnet50_v2.pth."
        )
    flat = target_deep and "conv3.weight" in state_dict and "conv1.weight" in state_dict
    mapped, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith("fc."):
            dropped.append(key)
            continue
        new_key = key
        if flat:
            for src, dst in _FLAT_STEM_TO_TIMM.items():
                if key.startswith(src):
                    new_key = dst + key[len(src) :]
                    break
        mapped[new_key] = value
    return mapped, dropped


def timm_pretrained_cfg(source: str | os.PathLike):
    """
    The timm `PretrainedCfg` of a `backbone_pretrained` value, or `None` when it is a local file.

    Args:
        source (`str` or `os.PathLike`): a local file, a timm tag (`"resnet50s.gluon_in1k"`, or a bare architecture
            for its default tag) or a timm Hub id (`"timm/vit_small_patch14_dinov2.lvd142m"`).

    Returns:
        `timm.models.PretrainedCfg` or `None`.
    """
    import timm

    source = os.fspath(source)
    # A path that does not exist stays a path, so that reading it says which file is missing.
    looks_like_file = os.path.isabs(source) or source.startswith(".") or source.count("/") > 1
    if os.path.exists(source) or looks_like_file or Path(source).suffix in _WEIGHT_SUFFIXES:
        return None
    tag = source[len("timm/") :] if source.startswith("timm/") else source
    cfg = timm.models.get_pretrained_cfg(tag) if "/" not in tag else None
    if cfg is None:
        raise ValueError(
            f"backbone_pretrained={source!r} is neither an existing file nor a timm pretrained tag (e.g. "
            "'resnet50s.gluon_in1k' or 'timm/vit_small_patch14_dinov2.lvd142m'; `timm.list_pretrained()` lists them)."
        )
    return cfg


def backbone_normalization(source: str | os.PathLike | None) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """
    The `(mean, std)` the weights of `source` were trained with, from timm's `pretrained_cfg` (no download); `None`
    for no source or a local file (the caller then keeps its config's values, ImageNet's by default).

    Example:

    ```python
    >>> backbone_normalization("timm/vit_small_patch14_dinov2.lvd142m")
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    ```
    """
    cfg = timm_pretrained_cfg(source) if source else None
    if cfg is None:
        return None
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def fetch_backbone_weights(source: str | os.PathLike) -> str:
    """
    The local file of a `backbone_pretrained` value: the path itself, or the timm Hub repo's weights fetched with
    `huggingface_hub.hf_hub_download` (cached; offline, a cached copy is used). Offline without a copy, the error
    names the repo, the file and the local-file alternative.

    Args:
        source (`str` or `os.PathLike`): see [`timm_pretrained_cfg`].

    Returns:
        `str`: the path of the weights file.
    """
    from huggingface_hub import hf_hub_download

    cfg = timm_pretrained_cfg(source)
    if cfg is None:
        return os.fspath(source)
    if not cfg.hf_hub_id:
        raise ValueError(
            f"timm tag {os.fspath(source)!r} has no Hugging Face Hub repository (its weights are at {cfg.url!r}); "
            "download them yourself and pass the file: --set model.backbone_pretrained=/path/to/weights."
        )
    filename = cfg.hf_hub_filename or "model.safetensors"
    try:
        return hf_hub_download(repo_id=cfg.hf_hub_id, filename=filename)
    except Exception as err:  # offline, no cache, no access: every failure gets the same instructions
        raise OSError(
            f"could not get {filename!r} of the Hub repository {cfg.hf_hub_id!r} ({type(err).__name__}: {err}). On a "
            f"machine with the Hub run `hf download {cfg.hf_hub_id} {filename}` (it fills the Hugging Face cache, "
            f"which works offline afterwards), or download https://huggingface.co/{cfg.hf_hub_id}/resolve/main/"
            f"{filename} and pass the local file: --set model.backbone_pretrained=/path/to/{filename}."
        ) from err


def load_backbone_weights(
    model: GFSSModel, path: str | os.PathLike | None = None, strict: bool = True
) -> dict[str, list]:
    """
    Load pre-trained weights into `model.backbone` from a local file or a timm pretrained tag / Hub id.

    ResNet backbones accept timm deep-stem weights (`resnet50s.gluon_in1k`, identity keys) and the flat deep-stem
    layout of semseg's `resnet50_v2.pth` (`conv1/bn1/conv2/bn2/conv3/bn3`), as `.safetensors` or `.pth`, read by
    [`read_checkpoint`] (`weights_only=True`); the `fc` head is dropped; plain 7x7-stem and 32-wide-stem files are
    refused. Other backbones (ConvNeXt, ViT / DINOv2, ...) take timm-layout files, loaded by timm itself into a twin
    backbone (so timm's key filters apply, e.g. a ViT's position embedding resampled to `image_size`) whose tensors
    are then copied. A tag is fetched by [`fetch_backbone_weights`]. It lives here, not on the model, so that the
    model file exported for `trust_remote_code` reads no files.

    Args:
        model ([`GFSSModel`]): the model whose backbone receives the weights (in place).
        path (`str` or `os.PathLike`, *optional*): file, tag or Hub id; defaults to `model.config.backbone_pretrained`.
        strict (`bool`, *optional*, defaults to `True`): raise if a backbone tensor is missing or unexpected.

    Returns:
        `dict` with lists `missing`, `unexpected`, `dropped` (keys).

    Example:

    ```python
    >>> report = load_backbone_weights(model, "resnet50s.safetensors")  # doctest: +SKIP
    >>> report = load_backbone_weights(model, "timm/vit_small_patch14_dinov2.lvd142m")  # doctest: +SKIP
    ```
    """
    config = model.config
    source = path if path is not None else (config.backbone_pretrained or config.backbone_weights_path)
    if source is None:
        raise ValueError("no weights: pass `path` or set `config.backbone_pretrained` (a timm tag or a local file).")
    cfg = timm_pretrained_cfg(source)
    if cfg is not None and cfg.architecture != config.backbone:
        raise ValueError(
            f"backbone_pretrained={os.fspath(source)!r} holds weights of {cfg.architecture!r} but the model's backbone "
            f"is {config.backbone!r}; set model.backbone={cfg.architecture} or choose a tag of {config.backbone!r}."
        )
    path = fetch_backbone_weights(source)
    own = model.backbone.state_dict()
    if not any(key.startswith("layer1.") for key in own):
        return _load_timm_backbone(model, path, strict)
    mapped, dropped = _imagenet_to_timm_keys(read_checkpoint(path), own.keys())
    for key, value in mapped.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"backbone tensor {key!r} has shape {tuple(value.shape)} in {os.fspath(path)!r} but "
                f"{tuple(own[key].shape)} in {model.config.backbone!r}; the file is for another architecture."
            )
    result = model.backbone.load_state_dict(mapped, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    report = {"missing": missing, "unexpected": list(result.unexpected_keys), "dropped": dropped}
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"backbone weights from {os.fspath(path)!r} do not match {model.config.backbone!r}: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {list(result.unexpected_keys)[:5]}; "
            "pass strict=False to load the matching part."
        )
    logger.info(f"loaded backbone weights from {path}: {report}")
    return report


@torch.no_grad()
def _load_timm_backbone(model: GFSSModel, path: str, strict: bool) -> dict[str, list]:
    # A PSPNet segmentation checkpoint offered to a non-ResNet backbone: say what it is before timm lists keys.
    keys = read_checkpoint(path).keys()
    if any(key.startswith(("layer0.", "ppm.", "learner_base.", "backbone.layer1.", "layer4.")) for key in keys):
        raise ValueError(
            f"{path!r} holds ResNet / PSPNet weights, which do not fit the {model.config.backbone!r} backbone; give "
            f"weights of {model.config.backbone!r} in timm's layout (e.g. its timm tag), or use a ResNet backbone."
        )
    try:
        twin = create_backbone(model.config, pretrained=True, pretrained_cfg_overlay={"file": path})
    except RuntimeError as err:  # load_state_dict's report of missing / unexpected / mis-shaped keys
        if strict:
            raise ValueError(
                f"backbone weights from {path!r} do not match {model.config.backbone!r} "
                f"(backbone_kwargs={model.config.backbone_kwargs}): {err}"
            ) from err
        logger.warning(f"backbone weights from {path!r} do not match {model.config.backbone!r}; not loaded: {err}")
        return {"missing": list(model.backbone.state_dict()), "unexpected": [], "dropped": []}
    result = model.backbone.load_state_dict(twin.state_dict(), strict=True)
    report = {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "dropped": []}
    logger.info(f"loaded backbone weights from {path} through timm: {report}")
    return report


# --------------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------------
def build_model_card(report: ConversionReport, config: GFSSConfig):
    """
    The model card (`huggingface_hub.ModelCard`) of a converted model: the card of every GFSS checkpoint
    (`gfss_hf.cards.render_model_card`, same template) with a section on the source repository, commit, licence,
    file checksum and the conversion report.

    Args:
        report (`ConversionReport`): from the conversion.
        config (`GFSSConfig`): the converted model's config.

    Returns:
        `huggingface_hub.ModelCard`
    """
    from .cards import render_model_card

    info = report.source_info
    unlicensed = info.license == "other"
    where = (
        f"{config.dataset} fold {config.fold}" + (f" ({config.split_kind})" if config.split_kind else "")
        if config.dataset
        else "no fold (backbone only)"
    )
    source = {
        "repo": info.repo,
        "link": info.repo if info.repo.startswith("timm/") else f"https://github.com/{info.repo}",
        "commit": info.commit,
        "layout": report.layout,
        "license_note": info.license_note,
        "unlicensed": unlicensed,
        "rows": [
            ("source repository", f"{info.repo} @ `{info.commit}`"),
            ("layout", f"`{report.layout}`"),
            ("file", f"`{report.checkpoint or '-'}`"),
            ("sha256", f"`{report.checkpoint_sha256 or '-'}`"),
            ("classes", f"{where}: {config.num_labels} rows ({', '.join(config.class_names)})"),
            ("input", f'{config.image_size}x{config.image_size} canvas, `pad_mode="{config.pad_mode}"`'),
            ("dilation", f"`{config.dilation_style}` (PPM align_corners={config.ppm_align_corners})"),
            ("classifier bias", f"classifier_bias={config.classifier_bias}"),
        ],
        "report": report.summary(),
        "title": f"PSPNet ResNet-50 converted from {info.repo} ({report.layout})",
        "summary": f"Weights of {info.repo} converted to a `gfss_hf` `GFSSModel` (PSPNet: ResNet-50 deep stem, output "
        "stride 8, pyramid pooling, linear classifier).",
        "card_data": (
            {"license_name": "unspecified", "license_link": f"https://github.com/{info.repo}"} if unlicensed else {}
        ),
    }
    # A converted folder is not on the Hub yet: the card's snippets load it from where it lies.
    return render_model_card(config, repo_id="path/to/this/folder", license=info.license, source=source, commands=[])


def save_converted(
    model: GFSSModel,
    report: ConversionReport,
    output_dir: str | os.PathLike,
    image_processor: GFSSImageProcessor | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Write a converted model atomically: `save_pretrained` files, the image processor (source geometry), the model card
    `README.md` and `conversion_report.json` go to a temporary folder next to `output_dir`, which is then renamed.

    Args:
        model (`GFSSModel`): the converted model.
        report (`ConversionReport`): its report.
        output_dir (`str` or `os.PathLike`): destination folder.
        image_processor (`GFSSImageProcessor`, *optional*): defaults to `GFSSImageProcessor.from_config(model.config)`.
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `output_dir`.

    Returns:
        `Path`: `output_dir`.
    """
    output_dir = Path(output_dir).absolute()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} exists and is not empty; choose another folder or pass overwrite=True "
            "(--overwrite)."
        )
    processor = image_processor or GFSSImageProcessor.from_config(model.config)
    with atomic_folder(output_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        for weights in tmp.glob("*.safetensors"):
            apply_umask(weights)  # safetensors (0.8) creates its files 0600
        processor.save_pretrained(tmp)
        build_model_card(report, model.config).save(str(tmp / "README.md"))
        (tmp / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    logger.info(f"saved the converted model to {output_dir}")
    return output_dir
