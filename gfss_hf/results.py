"""The results schema of an evaluation: the outcome of [`gfss_hf.evaluation.evaluate_episodes`]
([`EvaluationResult`]), its files (`results.json` with every number, `results.md` with the headline table), reading
them back ([`load_results`] -> [`ResultEntry`]) and their Hub form (`huggingface_hub.EvalResult`, a model card's
`model-index`).

The metric keys and their display names are those of `gfss_hf.metrics` ([`METRIC_NAMES`], [`HEADLINE_METRICS`],
[`metric_keys`]); model cards (`gfss_hf.cards`), the Hub check (`gfss_hf.hub`) and `scripts/evaluate.py` go through
this module. It imports no model code, so reading results is cheap.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult
from transformers.utils import logging

from ._io import atomic_write_text
from .metrics import HEADLINE_METRICS, METRIC_NAMES, STD_SUFFIX, PooledIoU

__all__ = [
    "EvaluationResult",
    "ResultEntry",
    "eval_results_to_entries",
    "load_results",
    "results_markdown",
    "results_to_eval_results",
    "save_results",
]

logger = logging.get_logger(__name__)


@dataclass
class EvaluationResult:
    r"""
    Outcome of [`gfss_hf.evaluation.evaluate_episodes`].

    Args:
        protocol (`str`): the protocol.
        metrics (`dict[str, float]`): the numbers of [`metric_keys`] (fractions in [0, 1]).
        per_class (`dict[str, dict[str, float]]`): pooled IoU per class name, per accumulator.
        runs (`list[dict]`): `diam` / `capl`: the summary of each run.
        accumulators (`dict[str, PooledIoU]`): the reduced sums (`paper`: `fss`, `gfss_novel`, `gfss_base`;
            `diam` / `capl`: `run0`, `run1`, ...).
        num_episodes (`int`): episodes evaluated (all processes).
        episodes_hash (`str`): see [`gfss_hf.data.episodes.episodes_hash`].
        timing (`dict`): `episode_batch_size`, `seconds`, `episodes_per_second`, `num_processes`.
        cache (`dict`): feature cache statistics of the main process.
    """

    protocol: str
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    runs: list[dict]
    accumulators: dict[str, PooledIoU]
    num_episodes: int
    episodes_hash: str
    timing: dict[str, float]
    cache: dict[str, int]

    def to_dict(self) -> dict:
        """JSON-ready dict (accumulators as their integer sums)."""
        return {
            "protocol": self.protocol,
            "metrics": self.metrics,
            "per_class": self.per_class,
            "runs": self.runs,
            "num_episodes": self.num_episodes,
            "episodes_hash": self.episodes_hash,
            "timing": self.timing,
            "cache": self.cache,
            "accumulators": {k: v.state_dict() for k, v in self.accumulators.items()},
        }


def results_markdown(result: EvaluationResult, title: str | None = None) -> str:
    """A Markdown table of the headline numbers (mIoU in %, `mean ± std` over runs for `diam` / `capl`)."""
    columns = HEADLINE_METRICS[result.protocol]
    cells = []
    for key in columns:
        value = result.metrics[key]
        std = result.metrics.get(f"{key}{STD_SUFFIX}")
        cell = "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"
        cells.append(cell if std is None else f"{cell} ± {100 * std:.2f}")
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| " + " | ".join(METRIC_NAMES[key] for key in columns) + " |",
        "|" + "|".join("---:" for _ in columns) + "|",
        "| " + " | ".join(cells) + " |",
        "",
        f"{result.num_episodes} episodes ({result.protocol} protocol), episode list sha256 "
        f"`{result.episodes_hash[:16]}`, {result.timing['episodes_per_second']:.2f} episodes/s on "
        f"{result.timing['num_processes']} process(es).",
        "",
    ]
    return "\n".join(lines)


def save_results(output_dir: str | os.PathLike, result: EvaluationResult, config: Mapping[str, Any]) -> dict:
    """
    Write `results.json` (every number, the accumulators, `config`, the package version, the episode list hash) and
    `results.md` (the table) into `output_dir`, each atomically (temporary file + `os.replace`). This is the results
    schema: metric keys of [`metric_keys`] (named in [`METRIC_NAMES`]), read back by [`load_results`] and turned into
    the Hub's eval results by [`results_to_eval_results`].

    Returns:
        `dict`: the JSON payload.
    """
    from . import __version__

    payload = {"gfss_hf_version": __version__, "config": dict(config), **result.to_dict()}

    def clean(value):
        # JSON has no NaN: a metric of a class group that never occurred is written as null.
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    payload = clean(payload)
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(payload, indent=2, sort_keys=False))
    title = f"{config.get('dataset', '')} fold {config.get('fold', '')}, {config.get('shots', '')}-shot".strip()
    atomic_write_text(os.path.join(output_dir, "results.md"), results_markdown(result, title))
    return payload


# -- the results schema: reading results.json back, and its Hub form --------------------------------------------------
@dataclass(frozen=True)
class ResultEntry:
    """
    One evaluation in the results schema: a protocol on one fold at one number of shots.

    Args:
        protocol (`str`): `"paper"`, `"diam"` or `"capl"`.
        dataset (`str`): dataset key (`"pascal5i"`, `"coco20i"`, ...).
        fold (`int`): fold index.
        shots (`int`): supports per novel class (K).
        split (`str`, *optional*, defaults to `"val"`): evaluation split.
        metrics (`dict[str, float]`): headline metrics ([`HEADLINE_METRICS`] keys) in percent, 2 decimals.
        details (`dict[str, Any]`): scalar settings of the evaluation (seed, episodes, adaptation steps, ...).
        stds (`dict[str, float]`): standard deviation over runs (percent) of some metrics.
    """

    protocol: str
    dataset: str
    fold: int
    shots: int
    split: str = "val"
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    stds: dict[str, float] = field(default_factory=dict)

    @property
    def dataset_config(self) -> str:
        """The `model-index` dataset config: `fold{fold}-{shots}shot-{protocol}` (the Hub groups results by it)."""
        return f"fold{self.fold}-{self.shots}shot-{self.protocol}"


_ENTRY_KEYS = {"protocol", "dataset", "fold", "shots", "split", "metrics", "config"}
# Settings of a results.json's `config` worth keeping next to its numbers.
_CONFIG_KEYS = ("dataset", "fold", "shots", "protocol", "split_kind", "seed")
_ADAPTATION_KEYS = ("steps", "gamma", "lr")


def _entry_fields(raw: Mapping) -> dict:
    """The entry-level view of a results.json's nested `config` (see [`save_results`])."""
    config = raw.get("config")
    if not isinstance(config, Mapping):
        return {}
    out = {k: config[k] for k in _CONFIG_KEYS if config.get(k) is not None}
    options = config.get("options")
    adaptation = options.get("adaptation") if isinstance(options, Mapping) else None
    if isinstance(adaptation, Mapping):
        out.update({k: adaptation[k] for k in _ADAPTATION_KEYS if isinstance(adaptation.get(k), (int, float))})
    return out


def _required(entry: Mapping, name: str, where: str):
    if entry.get(name) is None:
        raise ValueError(
            f"{where} has no {name!r} (keys: {sorted(entry)}); every result entry needs protocol, dataset, fold, "
            "shots and metrics (see gfss_hf.results.load_results)."
        )
    return entry[name]


def _as_count(value, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not float(value).is_integer():
        raise ValueError(f"{where}: {name}={value!r} must be a non-negative integer, e.g. 0.")
    return int(value)


def _headline(metrics, protocol: str, percent: bool, where: str) -> tuple[dict[str, float], dict[str, float]]:
    """(metrics, stds) in percent: the protocol's headline keys that hold finite numbers."""
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}: 'metrics' must be an object of name -> number, got {type(metrics).__name__}.")
    unknown = sorted(k for k in metrics if str(k).removesuffix(STD_SUFFIX) not in METRIC_NAMES)
    if unknown:
        raise ValueError(f"{where}: unknown metric(s) {unknown}; results.json uses the keys {list(METRIC_NAMES)}.")
    headline = HEADLINE_METRICS.get(protocol, tuple(METRIC_NAMES))
    limit = 100.0 if percent else 1.0
    values: dict[str, float] = {}
    stds: dict[str, float] = {}
    for key in headline:
        for target, name in ((values, key), (stds, f"{key}{STD_SUFFIX}")):
            value = metrics.get(name)
            if name not in metrics:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                logger.warning(f"{where}: metric {name!r}={value!r} is not a finite number; left out.")
                continue
            if not 0.0 <= value <= limit:
                hint = "" if percent else ' results.json stores fractions; for percent add "metrics_unit": "percent".'
                raise ValueError(f"{where}: metric {name!r}={value} is outside [0, {limit:g}].{hint}")
            target[key] = round(float(value) * (1.0 if percent else 100.0), 2)
    return values, {k: v for k, v in stds.items() if k in values}


def _read_json(path) -> Any:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"results file {path!r} does not exist; run scripts/evaluate.py first.")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON ({err}).") from err


def _raw_entries(results, source: str) -> list[tuple[Mapping, bool, str]]:
    """Flatten every accepted layout into (entry, metrics are percent, where) triples."""
    if isinstance(results, (str, os.PathLike)):
        return _raw_entries(_read_json(results), os.fspath(results))
    if isinstance(results, Mapping) and "results" in results:
        percent = str(results.get("metrics_unit", "fraction")).lower() == "percent"
        items = results["results"]
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise ValueError(f"{source}: 'results' must be a list of entries, got {type(items).__name__}.")
        return [(item, percent, f"{source} entry {i}") for i, item in enumerate(items)]
    if isinstance(results, Mapping):
        return [(results, False, source)]
    if isinstance(results, Sequence) and not isinstance(results, (str, bytes)):
        out = []
        for i, item in enumerate(results):
            if isinstance(item, (str, os.PathLike)) or (isinstance(item, Mapping) and "results" in item):
                out.extend(_raw_entries(item, source))
            else:
                out.append((item, False, f"{source} entry {i}"))
        return out
    raise ValueError(f"{source}: expected a path, an object or a list of entries, got {type(results).__name__}.")


def load_results(
    results: str | os.PathLike | Mapping | Sequence | None, defaults: Mapping[str, Any] | None = None
) -> list[ResultEntry]:
    """
    Read evaluation results in the schema of [`save_results`], keeping each protocol's headline numbers.

    A `results.json` holds the settings under `config` (`dataset`, `fold`, `shots`, `protocol`, `seed`,
    `options.adaptation`) and the numbers under `metrics` (keys of [`metric_keys`], fractions in [0, 1]). Several
    evaluations may be gathered as `{"results": [entry, ...]}` (optionally with `"metrics_unit": "percent"`), where
    an entry gives `protocol`, `dataset`, `fold`, `shots` and `metrics` directly or through its `config`.

    Args:
        results (`str`, `os.PathLike`, `dict` or `list`, *optional*):
            A path to a `results.json`, a list of paths, or parsed content (`{"results": [...]}`, a list of entries,
            one entry). `None` gives an empty list.
        defaults (`Mapping`, *optional*):
            Values for entries that omit `dataset` / `fold` (e.g. those of the model's config).

    Returns:
        `list[ResultEntry]`, in file order, metrics in percent; entries without a finite headline number are
        dropped with a warning.

    Example:

    ```python
    >>> entries = load_results({"protocol": "paper", "dataset": "pascal5i", "fold": 0, "shots": 1,
    ...                         "metrics": {"fss_novel_miou": 0.559, "gfss_base_miou": 0.696}})
    >>> entries[0].metrics
    {'fss_novel_miou': 55.9, 'gfss_base_miou': 69.6}
    ```
    """
    if results is None:
        return []
    entries: list[ResultEntry] = []
    seen: dict[tuple, str] = {}
    for raw, top_percent, where in _raw_entries(results, "results"):
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} is a {type(raw).__name__}, not an object.")
        raw = {**{k: v for k, v in (defaults or {}).items() if v is not None}, **_entry_fields(raw), **raw}
        percent = top_percent or str(raw.get("metrics_unit", "")).lower() == "percent"
        protocol = str(_required(raw, "protocol", where))
        dataset = str(_required(raw, "dataset", where))
        fold = _as_count(_required(raw, "fold", where), "fold", where)
        shots = _as_count(_required(raw, "shots", where), "shots", where)
        metrics, stds = _headline(_required(raw, "metrics", where), protocol, percent, where)
        if not metrics:
            logger.warning(f"{where} has no finite headline metric; it is left out.")
            continue
        details = {
            k: v
            for k, v in raw.items()
            if k not in _ENTRY_KEYS and k != "metrics_unit" and isinstance(v, (str, int, float, bool))
        }
        entry = ResultEntry(protocol, dataset, fold, shots, str(raw.get("split") or "val"), metrics, details, stds)
        ident = (entry.dataset, entry.dataset_config, entry.split)
        if ident in seen:
            raise ValueError(
                f"{where} repeats dataset={dataset!r}, fold={fold}, shots={shots}, protocol={protocol!r} of "
                f"{seen[ident]}; keep one of the two evaluations."
            )
        seen[ident] = where
        entries.append(entry)
    return entries


def results_to_eval_results(
    entries: Sequence[ResultEntry], dataset_names: Mapping[str, str] | None = None
) -> list[EvalResult]:
    """
    The Hub form of result entries (`huggingface_hub.EvalResult`, a card's `model-index`): one dataset config per
    entry (`fold{fold}-{shots}shot-{protocol}`), one metric per headline key (`type` = the results.json key, `name` =
    its [`METRIC_NAMES`] display name), values in percent.

    Args:
        entries (`Sequence[ResultEntry]`): from [`load_results`].
        dataset_names (`Mapping[str, str]`, *optional*): display name per dataset key (default: the key).
    """
    out = []
    for entry in entries:
        args = {"fold": entry.fold, "shots": entry.shots, "protocol": entry.protocol, **entry.details}
        pretty = (dataset_names or {}).get(entry.dataset, entry.dataset)
        for key, value in entry.metrics.items():
            out.append(
                EvalResult(
                    task_type="image-segmentation",
                    task_name="Generalized Few-Shot Semantic Segmentation",
                    dataset_type=entry.dataset,
                    dataset_name=f"{pretty} fold {entry.fold} ({entry.shots}-shot)",
                    dataset_config=entry.dataset_config,
                    dataset_split=entry.split,
                    dataset_args=args,
                    metric_type=key,
                    metric_name=f"{METRIC_NAMES[key]}{' mIoU' if key.endswith('_miou') else ''} ({entry.protocol})",
                    metric_value=value,
                )
            )
    return out


def eval_results_to_entries(eval_results: Sequence[EvalResult] | None) -> list[ResultEntry]:
    """The inverse of [`results_to_eval_results`]: group `EvalResult`s (e.g. `ModelCard.load(...).data`) back into
    entries, to compare a card with the results it was made from."""
    groups: dict[tuple, dict] = {}
    for result in eval_results or []:
        args = dict(result.dataset_args or {})
        key = (result.dataset_type, result.dataset_config, result.dataset_split)
        if key not in groups:
            groups[key] = dict(
                protocol=str(args.get("protocol")),
                dataset=result.dataset_type,
                fold=int(args.get("fold", -1)),
                shots=int(args.get("shots", -1)),
                split=result.dataset_split or "val",
                metrics={},
                details={k: v for k, v in args.items() if k not in ("fold", "shots", "protocol")},
            )
        groups[key]["metrics"][result.metric_type] = float(result.metric_value)
    return [ResultEntry(**g) for g in groups.values()]
