"""`make demo` runs scripts/demo.py; this runs the same code on a reduced budget."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModel

ROOT = Path(__file__).resolve().parents[2]


def _load_demo():
    spec = importlib.util.spec_from_file_location("gfss_demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    demo = _load_demo()
    assert demo.main(["--output_dir", str(tmp_path), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| pre-training | method | 1-shot novel" in printed
    assert "FSS 2-way" in printed and "gamma = 10" in printed
    for folder in ("model_ce", "model_contrastive"):
        model = AutoModel.from_pretrained(tmp_path / folder)
        assert model.config.dataset == "synthetic" and model.config.fold == 0
        card = ModelCard.load(tmp_path / folder / "README.md")
        assert card.data.to_dict().get("model-index"), "the card carries model-index results"
    assert AutoModel.from_pretrained(tmp_path / "model_contrastive").projection is not None
    results = json.loads((tmp_path / "results.json").read_text())
    cells = results["results"]["model_contrastive"]
    assert set(cells) == {f"{k}shot/{v}" for k in (1, 5) for v in ("gamma0", "gamma10", "gamma10_skip")}
    for cell in cells.values():
        for key in ("fss_novel_miou", "gfss_novel_miou", "gfss_base_miou"):
            assert 0.0 <= cell["metrics"][key] <= 1.0
    assert (tmp_path / "results.md").read_text().count("\n|") >= 9
    with Image.open(tmp_path / "qualitative.png") as figure:
        assert figure.width > 600 and figure.height > 400
    # A second run reuses the trained models instead of training again.
    assert demo.main(["--output_dir", str(tmp_path), "--quick"]) == 0
    assert "reusing" in capsys.readouterr().out
    # One process instead of one per model (the default with 2+ cores): same models, same episodes, same numbers up
    # to the float rounding of a different thread count.
    # It also trains the opt-in third model (novel pixels labelled background during pre-training) and adds its rows.
    everything = ["--models", "model_ce", "model_contrastive", "model_ce_novel_bg"]
    assert demo.main(["--output_dir", str(tmp_path), "--quick", "--jobs", "1", *everything]) == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "| CE, novel pixels = background | FSS 2-way |" in printed
    assert yaml.safe_load((tmp_path / "model_ce_novel_bg" / "training_config.yaml").read_text())["novel_to_background"]
    assert not yaml.safe_load((tmp_path / "model_ce" / "training_config.yaml").read_text())["novel_to_background"]
    again = json.loads((tmp_path / "results.json").read_text())["results"]
    for folder, cells in results["results"].items():
        for name, cell in cells.items():
            assert again[folder][name]["episodes_hash"] == cell["episodes_hash"]
            for key, value in cell["metrics"].items():
                if isinstance(value, float) and value == value:
                    assert again[folder][name]["metrics"][key] == pytest.approx(value, abs=0.02), (folder, name, key)


def test_demo_rejects_a_bad_job_count():
    demo = _load_demo()
    with pytest.raises(SystemExit):
        demo.parse_args(["--jobs", "0"])


@pytest.mark.parametrize("terminal", [True, False])
def test_parallel_jobs_get_their_own_progress_line_on_a_terminal(terminal, monkeypatch):
    """Two jobs' bars on one terminal line overwrite each other; tqdm in the job's process reads TQDM_POSITION."""
    demo = _load_demo()
    monkeypatch.setenv("TQDM_POSITION", "7")  # inherited from the user's shell: never passed on as is
    env = demo.job_env(1, threads=3, terminal=terminal)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    probe = (
        "import io; from tqdm import tqdm; bar = tqdm(total=1, file=io.StringIO()); print(abs(bar.pos)); bar.close()"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == (1 if terminal else 0)


def test_readme_demo_table_is_the_committed_demo_run():
    """The README's demo table is the table of docs/demo_results.json (the results.json of the run it reports)."""
    demo = _load_demo()
    run = json.loads((ROOT / "docs" / "demo_results.json").read_text(encoding="utf-8"))
    table = demo.results_table(run["results"])
    assert table.count("\n") >= 9
    assert table in (ROOT / "README.md").read_text(encoding="utf-8")
    assert run["date"][:10] in (ROOT / "README.md").read_text(encoding="utf-8")
