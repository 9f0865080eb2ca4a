"""A saved folder loads with trust_remote_code=True in a fresh process where gfss_hf cannot be imported."""

import json
import subprocess
import sys
import textwrap

import torch

from gfss_hf import GFSSConfig, GFSSImageProcessor, GFSSModel


def test_trust_remote_code_load_without_package(tmp_path):
    torch.manual_seed(0)
    config = GFSSConfig(
        backbone="test_resnet", hidden_size=32, image_size=64, projection_dim=16, base_class_names=("a", "b")
    )
    model = GFSSModel(config).eval()
    model.expand_classifier(["novel"])
    model.save_pretrained(tmp_path / "model")
    GFSSImageProcessor.from_config(config).save_pretrained(tmp_path / "model")
    saved = sorted(p.name for p in (tmp_path / "model").iterdir())
    for name in (
        "configuration_gfss.py",
        "modeling_gfss.py",
        "losses.py",
        "image_processing_gfss.py",
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
    ):
        assert name in saved
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation"}

    image = torch.rand(3, 50, 70)
    torch.save(image, tmp_path / "image.pt")
    processor = GFSSImageProcessor.from_config(config)
    with torch.no_grad():
        expected = model(**{"pixel_values": processor(image)["pixel_values"]}).logits
    torch.save(expected, tmp_path / "expected.pt")

    script = textwrap.dedent(f"""
        import sys
        sys.modules["gfss_hf"] = None  # the package must not be needed
        import torch
        from transformers import AutoImageProcessor, AutoModel, AutoModelForSemanticSegmentation
        folder = {str(tmp_path / "model")!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        seg = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
        assert type(seg).__name__ == "GFSSModel", type(seg)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert "transformers_modules" in type(model).__module__, type(model).__module__
        assert model.config.novel_class_names == ("novel",), model.config.novel_class_names
        image = torch.load({str(tmp_path / "image.pt")!r})
        with torch.no_grad():
            logits = model(pixel_values=processor(image)["pixel_values"]).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        print("REMOTE-OK")
    """)
    env_script = tmp_path / "check.py"
    env_script.write_text(script)
    result = subprocess.run(
        [sys.executable, str(env_script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
