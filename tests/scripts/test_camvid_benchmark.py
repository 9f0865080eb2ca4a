"""scripts/camvid_benchmark.py on its `--quick` budget over the real CamVid images (`GFSS_SAMPLE_DATA`)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("gfss_camvid_benchmark", ROOT / "scripts" / "camvid_benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_camvid_benchmark_quick(sample_data, tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # the index cache
    bench = _load_script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["--data_dir", str(sample_data / "camvid"), "--output_dir", str(tmp_path), "--quick", "--folds", "0"]
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "QUICK BUDGET" in printed and "support mask pasted" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["support_split"] == "train" and results["folds"] == [0]
    fold = results["results"]["fold0"]
    cells = {
        f"{p}/{s}shot/{v}" for p in ("paper", "diam") for s in (1, 5) for v in ("gamma0", "gamma10", "gamma10_skip")
    }
    for model in ("ce", "contrastive"):
        assert set(fold["models"][model]) == cells
        for cell in fold["models"][model].values():
            assert set(cell["novel_per_class"]) <= {"Tree", "SignSymbol", "Car"}
    # The baselines score the same episodes as the models; "every pixel = novel" is the class's share of the
    # valid query pixels, so it is in (0, 1) for every class that has episodes.
    for cell, baselines in fold["baselines"].items():
        for name in ("all_novel", "support_mask"):
            values = [v for k, v in baselines[name].items() if k != "mean"]
            assert values and all(0.0 <= v <= 1.0 for v in values), (cell, name)
        assert all(0.0 < v < 1.0 for k, v in baselines["all_novel"].items() if k != "mean")
    markdown = (tmp_path / "results.md").read_text()
    assert "`paper` protocol" in markdown and "`diam` protocol" in markdown
    with Image.open(tmp_path / "qualitative.png") as figure:
        assert figure.width > 1000 and np.asarray(figure).std() > 0
        # The colour legend is a light strip on the right (draw_legend's background).
        assert (np.asarray(figure.convert("RGB"))[:, -2:] == 245).all()
    # The images are linked, never copied, into the output folder.
    assert all(p.is_symlink() for p in (tmp_path / "quick_data" / "val").iterdir())


def test_baseline_ious_by_hand():
    bench = _load_script()
    from gfss_hf.data.episodes import EpisodeSpec
    from gfss_hf.data.splits import get_split

    class Source:
        def __init__(self, labels):
            self.labels = labels

        def get_by_id(self, image_id):
            return {"label": self.labels[image_id]}

    query = np.array([[9, 9, 1, 255]], dtype=np.uint8)  # Car (id 9) on 2 pixels, 1 void pixel
    support = np.array([[9, 1, 1, 9]], dtype=np.uint8)
    spec = EpisodeSpec("camvid", 0, "paper", 0, 0, "q", {9: ["s"]}, [9])
    out = bench.baseline_ious([spec], get_split("camvid", 0), Source({"q": query}), Source({"s": support}))
    assert out["all_novel"]["Car"] == 2 / 3  # 3 valid pixels predicted, 2 are Car
    assert out["support_mask"]["Car"] == 1 / 2  # pasted {0, 3}, void 3 dropped: {0} vs {0, 1}


def test_published_tables_are_those_of_the_committed_run():
    """docs/README_camvid.md's tables are the rendering of docs/camvid_results.json (the results.json of the run they
    report), and README.md quotes its headline numbers from the same run."""
    from gfss_hf.data.splits import get_split

    bench = _load_script()
    run = json.loads((ROOT / "docs" / "camvid_results.json").read_text(encoding="utf-8"))
    assert not run["quick"] and run["folds"] == [0, 1] and run["models"] == ["ce", "contrastive"]
    doc = (ROOT / "docs" / "README_camvid.md").read_text(encoding="utf-8")
    for fold in run["folds"]:
        table = bench.fold_tables(run["results"][f"fold{fold}"], get_split("camvid", fold))
        assert table.count("\n") >= 40
        assert table.strip() in doc, fold
    assert run["date"][:10] in doc and run["date"][:10] in (ROOT / "README.md").read_text(encoding="utf-8")
