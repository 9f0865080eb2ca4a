import pytest

from gfss_hf import GFSSConfig


def test_id2label_derived_from_names():
    config = GFSSConfig(base_class_names=("cat", "dog"), novel_class_names=("cow",))
    assert config.id2label == {0: "background", 1: "cat", 2: "dog", 3: "cow"}
    assert config.label2id["cow"] == 3
    assert config.num_labels == 4
    assert config.num_base_classes == 2 and config.num_novel_classes == 1
    assert config.class_names == ["background", "cat", "dog", "cow"]


def test_round_trip_keeps_names(tmp_path):
    config = GFSSConfig(base_class_names=("cat", "dog"), novel_class_names=("cow",), pool_scales=(1, 3))
    config.save_pretrained(tmp_path)
    loaded = GFSSConfig.from_pretrained(tmp_path)
    assert loaded.id2label == config.id2label
    assert loaded.base_class_names == ("cat", "dog")
    assert loaded.novel_class_names == ("cow",)
    assert loaded.pool_scales == (1, 3)


def test_id2label_only_config_provides_names():
    config = GFSSConfig(id2label={"0": "bg", "1": "a", "2": "b"})
    assert config.background_name == "bg"
    assert config.base_class_names == ("a", "b")


def test_disagreeing_id2label_is_an_error():
    with pytest.raises(ValueError, match="id2label"):
        GFSSConfig(base_class_names=("a",), id2label={0: "background", 1: "zzz"})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("output_stride", 7, "output_stride=7.*8, 16 and 32"),
        ("dilation_style", "caffe", "dilation_style='caffe'.*allowed"),
        ("pool_scales", (0, 2), "pool_scales"),
        ("hidden_size", 0, "hidden_size=0"),
        ("dropout", 1.5, "dropout=1.5"),
        ("image_size", 8, "image_size=8"),
        ("pad_mode", "edge", "pad_mode='edge'"),
        ("projection_source", "layer3", "projection_source='layer3'"),
        ("label_smoothing", 1.0, "label_smoothing"),
        ("ignore_index", 300, "ignore_index=300"),
        ("dropout", float("nan"), "dropout=nan is invalid: expected a finite number"),
        ("label_smoothing", float("inf"), "label_smoothing=inf is invalid: expected a finite number"),
        ("hidden_size", float("nan"), "hidden_size=nan is invalid: expected an integer, got float"),
        ("image_size", float("inf"), "image_size=inf is invalid: expected an integer, got float"),
        ("projection_dim", "8", "projection_dim='8' is invalid: expected an integer, got str"),
    ],
)
def test_bad_values_name_field_and_rule(field, value, match):
    with pytest.raises(ValueError, match=match):
        GFSSConfig(**{field: value})


def test_duplicate_class_names_rejected():
    with pytest.raises(ValueError, match="'cat' appears twice"):
        GFSSConfig(base_class_names=("cat",), novel_class_names=("cat",))
    with pytest.raises(ValueError, match="'background' appears twice"):
        GFSSConfig(base_class_names=("background",))


def test_set_class_names_updates_labels():
    config = GFSSConfig(base_class_names=("a",))
    config.set_class_names(novel_class_names=("n1", "n2"))
    assert config.id2label == {0: "background", 1: "a", 2: "n1", 3: "n2"}
    assert config.num_labels == 4
