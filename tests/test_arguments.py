"""Flags generated from the dataclasses: every field is a flag with its type, choices, default and docstring help."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from gfss_hf.adaptation import AdaptationConfig
from gfss_hf.arguments import dataclass_flags, field_docs
from gfss_hf.training_config import TrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_field_docs_read_the_args_section():
    docs = field_docs(AdaptationConfig)
    assert docs["steps"] and docs["gamma"].startswith("weight of the distillation term")
    assert "\n" not in docs["novel_init"] and "Example" not in " ".join(docs.values())
    assert field_docs(TrainingConfig)["mixed_precision"].startswith('`"no"`')


def test_flags_follow_the_dataclass():
    flags = dataclass_flags(TrainingConfig, include=("mixed_precision", "fold"), optional=True)
    parser = HfArgumentParser([flags])
    assert parser.parse_args([]).mixed_precision is None  # "not given": the YAML keeps its value
    assert parser.parse_args(["--mixed_precision", "bf16", "--fold", "2"]).fold == 2
    with pytest.raises(SystemExit):  # Literal[...] -> choices
        parser.parse_args(["--mixed_precision", "fp8"])
    assert "[--mixed_precision {no,fp16,bf16}]" in parser.format_usage().replace("\n", " ").replace("  ", " ")


def test_evaluate_has_a_flag_for_every_adaptation_field():
    script = _script("evaluate")
    names = {f.name for f in dataclasses.fields(script.METHOD_FLAGS)}
    # Every field but those the protocol or the model decide: a new AdaptationConfig field needs no edit here.
    assert names == {f.name for f in dataclasses.fields(AdaptationConfig)} - {
        "method",
        "seed",
        "align_corners",
        "ignore_index",
    }
    args = script.parse_args(["model_dir", "--steps", "7", "--kd_skip_novel", "--loss_resolution", "feature"])
    assert (args.steps, args.kd_skip_novel, args.loss_resolution, args.gamma) == (7, True, "feature", 10.0)
    assert "distillation" in script.parse_args.__globals__["HfArgumentParser"]([script.METHOD_FLAGS]).format_help()
