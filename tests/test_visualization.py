"""gfss_hf.visualization: palette, colourised maps, overlays, legends and panels (shapes, colours, validation)."""

import numpy as np
import pytest
import torch
from PIL import Image

from gfss_hf.visualization import (
    BACKGROUND_COLOR,
    IGNORE_COLOR,
    EpisodeRow,
    colorize,
    draw_legend,
    episode_figure,
    legend_entries,
    make_palette,
    overlay,
    palette_image,
    panels,
)


@pytest.fixture
def label_map():
    labels = np.zeros((40, 60), dtype=np.int64)
    labels[5:20, 10:30] = 1
    labels[25:35, 35:55] = 3
    labels[:3, :3] = 255
    return labels


def test_palette_background_black_ignore_white_classes_distinct():
    palette = make_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert tuple(palette[0]) == BACKGROUND_COLOR == (0, 0, 0)
    assert tuple(palette[255]) == IGNORE_COLOR == (255, 255, 255)
    classes = palette[1:255].astype(int)
    assert len({tuple(c) for c in classes}) == 254
    # No class colour can be taken for background or ignore.
    assert classes.sum(axis=1).min() > 60 and classes.sum(axis=1).max() < 3 * 255 - 60
    # Neighbouring ids, which are often seen together, are clearly different.
    assert np.abs(classes[1:] - classes[:-1]).sum(axis=1).min() > 80


def test_colorize_shapes_and_colours(label_map):
    rgb = colorize(label_map)
    palette = make_palette()
    assert rgb.shape == (40, 60, 3) and rgb.dtype == np.uint8
    assert (rgb[label_map == 0] == 0).all()
    assert (rgb[label_map == 255] == 255).all()
    assert (rgb[label_map == 3] == palette[3]).all()
    assert (colorize(torch.from_numpy(label_map)) == rgb).all()


def test_palette_image_stores_the_ids(label_map, tmp_path):
    path = tmp_path / "map.png"
    palette_image(label_map).save(path)
    with Image.open(path) as reread:
        assert reread.mode == "P"
        assert (np.asarray(reread) == label_map).all()
        assert (np.asarray(reread.convert("RGB")) == colorize(label_map)).all()


def test_overlay_blends_classes_and_keeps_background(label_map):
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    out = np.asarray(overlay(image, label_map, alpha=0.5)).astype(int)
    assert out.shape == (40, 60, 3)
    assert (out[label_map == 0] == 100).all()
    assert (np.abs(out[label_map == 255] - 178) <= 1).all()  # (100 + 255) / 2: ignore is rendered white
    expected = np.round(0.5 * 100 + 0.5 * make_palette()[1].astype(float))
    assert (np.abs(out[label_map == 1] - expected) <= 1).all()
    assert (np.asarray(overlay(image, label_map, alpha=0.0)) == image).all()


def test_legend_lists_each_present_class_with_its_colour(label_map):
    names = {0: "background", 1: "zebra", 2: "horse", 3: "car"}
    rows = legend_entries(names, label_map)
    assert [(i, n) for i, n, _ in rows] == [(0, "background"), (1, "zebra"), (3, "car"), (255, "ignore")]
    image = Image.new("RGB", (60, 40), (100, 100, 100))
    out = draw_legend(image, names, label_map, font_size=12)
    assert out.height >= 40 and out.width > 60
    strip = np.asarray(out)[:, 60:].reshape(-1, 3)
    present = {tuple(c) for c in strip}
    for _, _, colour in rows:  # every row's swatch is drawn
        assert colour in present
    assert tuple(make_palette()[2]) not in present  # horse is absent from the map, so not in the legend
    assert (np.asarray(out)[:40, :60] == 100).all()  # the picture itself is untouched
    # Without a map: every named class.
    assert [i for i, _, _ in legend_entries(["background", "a", "b"])] == [0, 1, 2]


def test_panels_titles_and_heights(label_map):
    a = Image.new("RGB", (60, 40), "red")
    b = colorize(label_map)
    out = panels([a, b, Image.new("RGB", (30, 80), "blue")], ["image", "prediction", "tall"], height=40)
    assert out.height > 40  # title bar above
    assert out.width >= 60 + 60 + 15
    with pytest.raises(ValueError, match="one title per image"):
        panels([a, b], ["only one"])
    with pytest.raises(ValueError, match="at least one image"):
        panels([])


def test_episode_figure_strips_tinted_support_and_legend_of_shown_classes(label_map):
    palette = make_palette()
    image = np.full((40, 60, 3), 100, np.uint8)
    support_mask = np.where(label_map == 1, 1, 0)
    predictions = [np.where(label_map == 3, 3, 0), np.where(label_map == 3, 5, 0)]
    rows = [EpisodeRow(image, support_mask, image, label_map, predictions, "zebra")] * 2
    names = {0: "background", 1: "zebra", 3: "car", 5: "bus", 7: "never shown", 255: "ignore"}
    out = np.asarray(episode_figure(rows, names, titles=("support", "query", "truth", "a", "b"), height=40))
    assert out.shape[0] >= 2 * 40  # two strips (plus title bars)
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    for k in (1, 3, 5):  # drawn in the panels and as legend swatches
        assert tuple(palette[k]) in colours
    assert tuple(palette[7]) not in colours  # named but in no map: not in the legend
    # The support panel is the picture tinted with the class colour where the mask is, untouched elsewhere.
    tinted = np.round(0.4 * 100 + 0.6 * palette[1].astype(float))
    assert any(np.abs(np.array(c, float) - tinted).max() <= 1 for c in colours)
    with pytest.raises(ValueError, match="one title per panel"):
        episode_figure(rows, names, titles=("support", "query"))
    with pytest.raises(ValueError, match="at least one episode"):
        episode_figure([], names)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 3, 4), dtype=np.int64), r"shape \(H, W\)"),
        (np.full((2, 2), 0.5), "integer class ids"),
        (np.full((2, 2), 300), "0..254"),
        (np.full((2, 2), -1), "0..254"),
        (Image.new("RGB", (2, 2)), "mode 'RGB'"),
    ],
)
def test_bad_label_maps_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        colorize(bad)


def test_bad_overlay_inputs_are_refused(label_map):
    image = Image.new("RGB", (60, 40))
    with pytest.raises(ValueError, match="label_map is 60x40 but the image is 61x40"):
        overlay(Image.new("RGB", (61, 40)), label_map)
    with pytest.raises(ValueError, match="alpha=1.5"):
        overlay(image, label_map, alpha=1.5)
    with pytest.raises(TypeError, match="load_image"):
        overlay("a.jpg", label_map)
    with pytest.raises(ValueError, match=r"ids \[3\] that id2label does not name"):
        draw_legend(image, {0: "background", 1: "zebra"}, label_map)
