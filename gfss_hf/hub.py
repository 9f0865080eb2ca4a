"""Publishing a GFSS checkpoint on the Hugging Face Hub: ONE path, stage -> check -> upload.

A training output folder is never uploaded as is. [`publish`] stages a clean export (only what a Hub repository
needs: weights, configs, the code that loads them with `trust_remote_code=True`, the `few-shot-segmentation`
pipeline, a model card with `model-index` results, no optimiser states or logs), checks it, and uploads the staged
folder. `scripts/push_to_hub.py` and `gfss_hf.training.pretrain(push_to_hub=True)` both go through it.

Checks ([`check_export`]; a failing export is never uploaded):

1. files: weights, `config.json` (with `auto_map`), `preprocessor_config.json`, `README.md`, and every code file that
   `auto_map` / `custom_pipelines` name, with the files they import relatively;
2. card: `huggingface_hub.ModelCard.load` reads the YAML header, `model-index` parses and matches `results.json`;
3. a fresh Python process in which `import gfss_hf` fails loads config, model, image processor and pipeline with
   `trust_remote_code=True`, computes logits equal to the package's, and runs one few-shot episode.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from transformers.utils import logging

from ._io import atomic_write_text
from .cards import load_training_config, render_model_card, save_model_card
from .image_processing_gfss import GFSSImageProcessor, load_image
from .modeling_gfss import GFSSModel
from .results import eval_results_to_entries, load_results

__all__ = [
    "DEFAULT_COMMIT_MESSAGE",
    "ExportCheckError",
    "check_card",
    "check_export",
    "check_files",
    "check_remote_code",
    "publish",
    "push_folder",
    "stage_export",
]

logger = logging.get_logger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload GFSS model"

PIPELINE_TASK = "few-shot-segmentation"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
REQUIRED_FILES = ("config.json", "preprocessor_config.json", "README.md")
# Files a staged export may hold besides code (*.py) and weight shards.
ALLOWED_EXTRA = {"results.json", "training_config.yaml"}


class ExportCheckError(RuntimeError):
    """The staged folder is not fit for the Hub; the message says what is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------------------------
# staging
# ---------------------------------------------------------------------------------------------------------------
def _load_pipeline_class():
    """The package's pipeline class, or None while the package ships none (the export then has no pipeline)."""
    try:
        from . import pipeline_few_shot_segmentation as module
    except ImportError:
        return None
    # Importing gfss_hf registers the task; calling the (idempotent) registration again costs nothing.
    if hasattr(module, "register_pipeline"):
        module.register_pipeline()
    return getattr(module, "FewShotSegmentationPipeline", None)


def stage_export(model_dir, staging_dir, repo_id: str, results=None, with_pipeline: bool = True) -> Path:
    """
    Write the folder to upload: weights, image processor, code (`trust_remote_code`), pipeline, README.md card, and
    copies of results.json and training_config.yaml. Nothing else of `model_dir` (checkpoints, logs) is copied.

    Args:
        model_dir (`str` or `os.PathLike`): a `save_pretrained` folder (the output of `scripts/pretrain.py`).
        staging_dir (`str` or `os.PathLike`): a new or empty folder.
        repo_id (`str`): the target repository (used in the card's code examples).
        results (*optional*): `results.json` path(s) of `scripts/evaluate.py` (see `gfss_hf.results.load_results`).
        with_pipeline (`bool`, *optional*, defaults to `True`): also export the `few-shot-segmentation` pipeline.

    Returns:
        `Path`: `staging_dir`.
    """
    model_dir, staging_dir = Path(model_dir), Path(staging_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} has no config.json; give the output folder written by scripts/pretrain.py "
            "(a save_pretrained folder)."
        )
    if staging_dir.exists() and any(staging_dir.iterdir()):
        raise FileExistsError(f"staging folder {str(staging_dir)!r} is not empty; give a new or empty folder.")
    model = GFSSModel.from_pretrained(model_dir).eval()
    if (model_dir / "preprocessor_config.json").is_file():
        # The class itself, not AutoImageProcessor: no backend swap can change the saved settings.
        processor = GFSSImageProcessor.from_pretrained(model_dir)
    else:
        logger.warning(f"{model_dir} has no preprocessor_config.json; exporting the processor matching the config.")
        processor = GFSSImageProcessor.from_config(model.config)

    pipeline_class = _load_pipeline_class() if with_pipeline else None
    if pipeline_class is not None:
        from transformers import pipeline

        pipe = pipeline(PIPELINE_TASK, model=model, image_processor=processor)
        # Writes custom_pipelines into config.json and copies the pipeline module + its relative imports.
        pipe.save_pretrained(staging_dir)
    else:
        if with_pipeline:
            logger.warning("gfss_hf has no few-shot-segmentation pipeline; the export holds model + processor only.")
        model.save_pretrained(staging_dir)
        processor.save_pretrained(staging_dir)

    card = render_model_card(model.config, results, repo_id=repo_id, training=load_training_config(model_dir))
    save_model_card(card, staging_dir / "README.md")
    # The raw numbers and the recipe travel with the weights (the card shows a digest of both).
    paths = [results] if isinstance(results, (str, os.PathLike)) else list(results or [])
    if paths and all(isinstance(p, (str, os.PathLike)) for p in paths):
        payloads = [json.loads(Path(p).read_text()) for p in paths]
        combined = payloads[0] if len(payloads) == 1 else {"results": payloads}
        atomic_write_text(staging_dir / "results.json", json.dumps(combined, indent=2))
    if (model_dir / "training_config.yaml").is_file():
        shutil.copyfile(model_dir / "training_config.yaml", staging_dir / "training_config.yaml")
    return staging_dir


# ---------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------
def _relative_imports(path: Path) -> set[str]:
    """Module files (`name.py`) imported relatively (`from .name import x`) by a code file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.add(node.module.split(".")[0] + ".py")
    return names


def check_files(folder: Path) -> dict:
    """Check that the folder holds weights, configs, card and all code it refers to; return the file list."""
    present = {p.name for p in folder.iterdir() if p.is_file()}
    missing = [f for f in REQUIRED_FILES if f not in present]
    if not any(w in present for w in WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        raise ExportCheckError(f"{folder} lacks {missing}; stage the export with stage_export (save_pretrained).")
    config = json.loads((folder / "config.json").read_text())
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    auto_map = dict(config.get("auto_map") or {})
    if "AutoConfig" not in auto_map or "AutoModel" not in auto_map:
        raise ExportCheckError(
            f"config.json auto_map={auto_map} lacks AutoConfig/AutoModel: the folder would not load with "
            "trust_remote_code=True. Import gfss_hf before saving (it calls register_for_auto_class)."
        )
    if "AutoImageProcessor" not in (preprocessor.get("auto_map") or {}):
        raise ExportCheckError(
            "preprocessor_config.json has no auto_map.AutoImageProcessor; save the processor after importing gfss_hf."
        )
    references = list(auto_map.values()) + list(preprocessor["auto_map"].values())
    for task in (config.get("custom_pipelines") or {}).values():
        references.append(task["impl"])
    code = {ref.split("--")[-1].split(".")[0] + ".py" for ref in references}
    pending, seen = list(code), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in present:
            raise ExportCheckError(
                f"{name} is referenced by the configs (or imported by their code) but missing from "
                f"{folder}; re-stage the export."
            )
        pending.extend(_relative_imports(folder / name))
    weights = {n for n in present if n.startswith("model") and n.endswith((".safetensors", ".index.json"))}
    unexpected = sorted(
        n for n in present if not (n.endswith(".py") or n in REQUIRED_FILES or n in ALLOWED_EXTRA or n in weights)
    )
    unexpected += sorted(f"{p.name}/" for p in folder.iterdir() if p.is_dir())
    if unexpected:
        raise ExportCheckError(f"{folder} holds files that do not belong in a model repository: {unexpected}.")
    return {"files": sorted(present), "code": sorted(seen), "pipeline": bool(config.get("custom_pipelines"))}


def check_card(folder: Path, results=None) -> dict:
    """The card's YAML loads with huggingface_hub and its model-index matches results.json."""
    try:
        card = ModelCard.load(folder / "README.md")
    except Exception as err:
        raise ExportCheckError(f"README.md of {folder} is not a valid model card: {err}") from err
    data = card.data
    for key, expected in (("library_name", "transformers"), ("pipeline_tag", "image-segmentation")):
        if getattr(data, key, None) != expected:
            raise ExportCheckError(f"card metadata {key}={getattr(data, key, None)!r}, expected {expected!r}.")
    got = sorted(eval_results_to_entries(data.eval_results), key=lambda e: (e.dataset, e.dataset_config))
    config = json.loads((folder / "config.json").read_text())
    defaults = {"dataset": config.get("dataset"), "fold": config.get("fold")}
    want = sorted(load_results(results, defaults=defaults), key=lambda e: (e.dataset, e.dataset_config))
    got_cmp = [(e.dataset, e.dataset_config, e.split, e.metrics) for e in got]
    want_cmp = [(e.dataset, e.dataset_config, e.split, e.metrics) for e in want]
    if got_cmp != want_cmp:
        raise ExportCheckError(f"the card's model-index {got_cmp} does not match results.json {want_cmp}.")
    return {"eval_results": len(data.eval_results or [])}


_REMOTE_CHECK = textwrap.dedent(
    """
    import json
    import sys

    sys.modules["gfss_hf"] = None  # the export must load without the gfss_hf package
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

    folder, probe_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    report = {"model_module": type(model).__module__, "processor_module": type(processor).__module__}
    # The export's own copy of the package's one image loader.
    load_image = sys.modules[type(processor).__module__].load_image
    query = load_image(f"{probe_dir}/query.png")
    support = load_image(f"{probe_dir}/support.png")
    mask = load_image(f"{probe_dir}/support_mask.png", mode=None)
    inputs = processor(query, return_tensors="pt")
    with torch.no_grad():
        logits = model(pixel_values=inputs["pixel_values"]).logits
    np.save(f"{probe_dir}/remote_logits.npy", logits.numpy())
    if getattr(config, "custom_pipelines", None):
        pipe = pipeline("few-shot-segmentation", model=folder, trust_remote_code=True)
        report["pipeline_module"] = type(pipe).__module__
        out = pipe(query, support_images=[support], support_masks=[mask], class_names=["probe"], mode="gfss",
                   steps=steps, return_label_map=True)
        report["labels"] = [s["label"] for s in out["segments"]]
        report["mask_sizes"] = sorted({s["mask"].size for s in out["segments"]})
        report["id2label"] = {int(k): v for k, v in out["id2label"].items()}
        np.save(f"{probe_dir}/remote_label_map.npy", out["label_map"])
    print("REPORT=" + json.dumps(report))
    """
)


def _write_probe(probe_dir: Path, image_size: int) -> None:
    """A query and a support with a bright square (its mask): deterministic, any model size."""
    rng = np.random.default_rng(0)
    height, width = max(image_size * 3 // 4, 32), max(image_size, 32)
    for name, (y, x) in (("query", (0.2, 0.3)), ("support", (0.4, 0.5))):
        image = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
        mask = np.zeros((height, width), dtype=np.uint8)
        y0, x0, side = int(y * height), int(x * width), max(height // 3, 4)
        image[y0 : y0 + side, x0 : x0 + side] = (230, 200, 40)
        mask[y0 : y0 + side, x0 : x0 + side] = 1
        Image.fromarray(image).save(probe_dir / f"{name}.png")
        if name == "support":
            Image.fromarray(mask).save(probe_dir / "support_mask.png")


def check_remote_code(folder: Path, steps: int = 2, timeout: int = 600) -> dict:
    """Load the folder with trust_remote_code in a fresh process without gfss_hf; compare its logits with the
    package's and run one pipeline episode."""
    files = json.loads((folder / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="gfss_remote_check_") as tmp:
        tmp = Path(tmp)
        _write_probe(tmp, int(files.get("image_size", 96)))
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "modules"), PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        proc = subprocess.run(
            [sys.executable, "-c", _REMOTE_CHECK, str(folder.resolve()), str(tmp), str(steps)],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        report_lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT=")]
        if proc.returncode != 0 or not report_lines:
            raise ExportCheckError(
                "loading the export with trust_remote_code=True in a fresh process without gfss_hf failed:\n"
                + proc.stderr[-4000:]
            )
        report = json.loads(report_lines[-1][len("REPORT=") :])
        for key in ("model_module", "processor_module", "pipeline_module"):
            if key in report and "transformers_modules" not in report[key]:
                raise ExportCheckError(f"{key}={report[key]!r}: the remote code was not used.")
        model = GFSSModel.from_pretrained(folder).eval()
        processor = GFSSImageProcessor.from_pretrained(folder)
        with torch.no_grad():
            expected = model(pixel_values=processor(load_image(tmp / "query.png"))["pixel_values"]).logits
        remote = torch.from_numpy(np.load(tmp / "remote_logits.npy"))
        if not torch.allclose(remote, expected, rtol=1e-4, atol=1e-5):
            diff = (remote - expected).abs().max().item()
            raise ExportCheckError(f"the remote-code model computes different logits (max abs diff {diff:.3g}).")
        query = load_image(tmp / "query.png")
        report["query_size"] = [query.width, query.height]
        if "labels" in report:
            pipe = _package_pipeline(model, processor)
            out = pipe(
                query,
                support_images=[load_image(tmp / "support.png")],
                support_masks=[load_image(tmp / "support_mask.png", mode=None)],
                class_names=["probe"],
                mode="gfss",
                steps=steps,
                return_label_map=True,
            )
            remote_map = np.load(tmp / "remote_label_map.npy")
            report["label_map_agreement"] = float((remote_map == out["label_map"]).mean())
            _compare_pipelines(report, list(model.config.class_names))
    return report


def _compare_pipelines(report: dict, class_names: list[str]) -> None:
    """The remote pipeline's episode must give what the package's pipeline gives on the same inputs."""
    names = [*class_names, "probe"]
    if set(report["labels"]) - set(names) or list(report["id2label"].values()) != names:
        raise ExportCheckError(
            f"the remote pipeline returned labels {report['labels']} / classes {report['id2label']}; expected {names}."
        )
    if report["mask_sizes"] != [report["query_size"]]:
        raise ExportCheckError(f"remote masks have sizes {report['mask_sizes']}, the query is {report['query_size']}.")
    agreement = report["label_map_agreement"]
    if agreement < 0.999:
        raise ExportCheckError(
            f"the remote pipeline's label map agrees with the package's on only {agreement:.1%} of the pixels."
        )


def _package_pipeline(model, processor):
    from transformers import pipeline

    _load_pipeline_class()
    return pipeline(PIPELINE_TASK, model=model, image_processor=processor)


def check_export(folder, results=None, steps: int = 2) -> dict:
    """Run all checks on a staged folder; raise `ExportCheckError` on the first failure. Returns a report."""
    folder = Path(folder)
    report = {"folder": str(folder)}
    report.update(check_files(folder))
    report.update(check_card(folder, results))
    report["remote"] = check_remote_code(folder, steps=steps)
    return report


# ---------------------------------------------------------------------------------------------------------------
# push
# ---------------------------------------------------------------------------------------------------------------
def push_folder(
    folder,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Create the repo if needed and upload the staged folder in one commit. Returns the commit URL."""
    api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id, repo_type="model", folder_path=str(folder), revision=revision, commit_message=commit_message
    )
    return str(getattr(info, "commit_url", info))


def publish(
    model_dir: str | os.PathLike,
    repo_id: str,
    results=None,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    with_pipeline: bool = True,
    check_steps: int = 2,
    staging_dir: str | os.PathLike | None = None,
    dry_run: bool = False,
) -> dict:
    """
    Stage, check and (unless `dry_run`) upload a trained checkpoint: the one way this package publishes.

    Args:
        model_dir (`str` or `os.PathLike`): a `save_pretrained` folder (the output of `scripts/pretrain.py`).
        repo_id (`str`): the Hub repository, e.g. `"gfss-hf/gfss-pascal5i-fold0"`.
        results (*optional*): `results.json` path(s) of `scripts/evaluate.py` for the card's `model-index`.
        token (`str`, *optional*): Hub token (default: the logged-in one).
        private (`bool`, *optional*, defaults to `False`): create the repository as private.
        revision (`str`, *optional*): branch to push to.
        commit_message (`str`, *optional*): the commit's message.
        with_pipeline (`bool`, *optional*, defaults to `True`): also export the pipeline.
        check_steps (`int`, *optional*, defaults to 2): adaptation steps of the pipeline check.
        staging_dir (`str` or `os.PathLike`, *optional*): where to stage (kept); default: a temporary folder,
            removed afterwards.
        dry_run (`bool`, *optional*, defaults to `False`): stage and check only; the Hub is not contacted.

    Returns:
        `dict`: the check report, with `commit_url` after an upload.

    Raises:
        `ExportCheckError`: the staged export fails a check (nothing is uploaded).
    """
    with tempfile.TemporaryDirectory(prefix="gfss_export_") as tmp:
        staging = Path(staging_dir) if staging_dir else Path(tmp) / "export"
        stage_export(model_dir, staging, repo_id, results=results, with_pipeline=with_pipeline)
        report = check_export(staging, results, steps=check_steps)
        if not dry_run:
            report["commit_url"] = push_folder(
                staging, repo_id, token=token, private=private, revision=revision, commit_message=commit_message
            )
    return report
