import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from gfss_hf import GFSSConfig, GFSSImageProcessor
from gfss_hf.image_processing_gfss import IMAGENET_MEAN, IMAGENET_STD, load_image, load_mask


@pytest.fixture
def processor():
    return GFSSImageProcessor(image_size=96)


def test_resize_pad_normalise(processor):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    batch = processor(image)
    assert batch["pixel_values"].shape == (1, 3, 96, 96)
    assert batch["resized_sizes"].tolist() == [[48, 96]]
    assert batch["original_sizes"].tolist() == [[30, 60]]
    # mean-colour canvas: padded pixels normalise to 0
    assert torch.all(batch["pixel_values"][0, :, 48:, :] == 0)
    # content: bilinear resize of the image then ImageNet normalisation
    expected = np.asarray(Image.fromarray(image).resize((96, 48), Image.BILINEAR), np.float32) / 255.0
    expected = (expected - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(batch["pixel_values"][0, :, :48].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_zero_padding_mode():
    processor = GFSSImageProcessor(image_size=64, pad_mode="zero")
    batch = processor(np.full((64, 32, 3), 0, np.uint8))
    # black padding is black after normalisation too: same value as the black content
    torch.testing.assert_close(batch["pixel_values"][0, :, :, 40], batch["pixel_values"][0, :, :, 0])


def test_masks_nearest_with_ignore_padding(processor):
    mask = np.zeros((30, 60), np.uint8)
    mask[10:20, 20:40] = 7
    mask[0, 0] = 255
    batch = processor(np.zeros((30, 60, 3), np.uint8), segmentation_maps=mask)
    labels = batch["labels"][0]
    assert labels.dtype == torch.int64
    assert set(labels.unique().tolist()) <= {0, 7, 255}
    assert torch.all(labels[48:] == 255)
    assert labels[30, 50].item() == 7


@pytest.mark.parametrize("size", [(24, 48), (48, 24), (32, 32), (12, 96)])
def test_round_trip_is_exact_on_label_maps(processor, size):
    """Preprocess a label map, use its one-hot as logits, post-process: the original map comes back exactly."""
    rng = np.random.default_rng(1)
    height, width = size
    label = rng.integers(0, 5, (height, width))
    batch = processor(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), segmentation_maps=label)
    canvas = batch["labels"]
    assert torch.all(canvas[0, : batch["resized_sizes"][0, 0], : batch["resized_sizes"][0, 1]] != 255)
    logits = torch.nn.functional.one_hot(canvas.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    back = processor.post_process_semantic_segmentation(logits, target_sizes=batch["original_sizes"])
    assert back[0].shape == (height, width)
    np.testing.assert_array_equal(back[0].numpy(), label)


def test_post_process_from_feature_resolution_logits(processor):
    logits = torch.zeros(1, 3, 12, 12)
    logits[0, 2, :6, :] = 5.0  # the top half of the canvas = the valid region of a 2:1 image
    out = processor.post_process_semantic_segmentation(logits, target_sizes=[(40, 80)])[0]
    assert out.shape == (40, 80)
    assert torch.all(out == 2)


@pytest.mark.parametrize("size", [(37, 53), (53, 37), (96, 96), (5, 300)])
@pytest.mark.parametrize("resolution", [96, 12])
def test_banded_post_processing_equals_one_band(processor, size, resolution):
    """Banding (which bounds memory on huge images) changes nothing: every band height gives the values of one
    band, and those agree with F.interpolate to float32 rounding."""
    import torch.nn.functional as F

    logits = torch.randn(7, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 4
    height, width = size
    whole = torch.cat([b for _, b in processor.resized_logit_bands(logits, size, band_rows=height)], dim=1)
    for rows in (1, 2, 7):
        starts, bands = zip(*processor.resized_logit_bands(logits, size, band_rows=rows))
        assert list(starts) == list(range(0, height, rows))
        assert torch.equal(torch.cat(bands, dim=1), whole), rows
    new_h, new_w = processor.resized_size(height, width)
    crop = logits[None, :, : max(1, round(new_h * resolution / 96)), : max(1, round(new_w * resolution / 96))]
    reference = F.interpolate(crop, size=size, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(whole, reference, rtol=0, atol=1e-5)
    assert torch.equal(processor.post_process_logits(logits[None], [size])[0], whole)
    labels = processor.post_process_semantic_segmentation(logits[None], target_sizes=[size])[0]
    assert torch.equal(labels, whole.argmax(dim=0))


def test_input_kinds(processor, tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    inputs = [
        Image.fromarray(rgb),
        rgb,
        str(path),
        path,
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(rgb).convert("RGBA"),
        np.zeros((20, 30), np.uint8),
        np.zeros((20, 30), np.uint16),
        Image.fromarray(np.full((20, 30), 40000, np.uint16)),
        torch.rand(3, 20, 30),
    ]
    batch = processor(inputs)
    assert batch["pixel_values"].shape == (len(inputs), 3, 96, 96)
    np.testing.assert_allclose(batch["pixel_values"][0], batch["pixel_values"][2])
    assert load_image(Image.fromarray(np.full((4, 4), 65535, np.uint16))).getpixel((0, 0)) == (255, 255, 255)


def _save_with_orientation(array, path, orientation, **kwargs):
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    Image.fromarray(array).save(path, exif=exif, **kwargs)


# How a viewer shows stored pixels for each EXIF orientation (numpy, independent of PIL.ImageOps).
DISPLAYED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.swapaxes(a, 0, 1), 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
def test_exif_orientation_is_applied_to_images_and_masks(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = DISPLAYED[orientation](stored)
    path = tmp_path / "phone.png"
    _save_with_orientation(stored, path, orientation)
    for source in (path, str(path), Image.open(path)):
        image = load_image(source)
        assert np.array_equal(np.asarray(image), expected), source
    # Loading twice (the pipeline's preprocess, then the processor) does not rotate twice.
    assert np.array_equal(np.asarray(load_image(load_image(Image.open(path)))), expected)
    labels = stored[..., 0] % 3
    _save_with_orientation(labels, tmp_path / "mask.png", orientation)
    assert np.array_equal(load_mask(tmp_path / "mask.png"), DISPLAYED[orientation](labels))
    assert np.array_equal(load_mask(Image.open(tmp_path / "mask.png")), DISPLAYED[orientation](labels))


def test_transparent_pixels_on_a_background_colour():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    image = load_image(Image.fromarray(rgba, "RGBA"), background="white")
    assert image.getpixel((0, 0)) == (10, 20, 30) and image.getpixel((1, 1)) == (255, 255, 255)
    assert load_image(Image.fromarray(rgba, "RGBA")).getpixel((1, 1)) == (0, 0, 0)


def test_bad_inputs_have_clear_errors(processor, tmp_path):
    with pytest.raises(ValueError, match="0x5"):
        processor(np.zeros((5, 0, 3), np.uint8))
    with pytest.raises(ValueError, match="20000x10.*limit"):
        processor(np.zeros((10, 20000), np.uint8))
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor(str(tmp_path / "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.png.*not a readable image"):
        processor(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match="segmentation map 0 has size 10x10 but its image has 20x10"):
        processor(np.zeros((10, 20, 3), np.uint8), segmentation_maps=np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="2 images but 1 segmentation maps"):
        processor([np.zeros((4, 4, 3), np.uint8)] * 2, segmentation_maps=[np.zeros((4, 4), np.uint8)])
    with pytest.raises(ValueError, match="single-channel"):
        load_mask(np.stack([np.zeros((4, 4)), np.ones((4, 4)), np.zeros((4, 4))], -1))
    with pytest.raises(ValueError, match="pad_mode"):
        GFSSImageProcessor(pad_mode="reflect")


def test_save_load_and_auto(tmp_path):
    processor = GFSSImageProcessor(image_size=80, pad_mode="zero")
    processor.save_pretrained(tmp_path)
    GFSSConfig(image_size=80).save_pretrained(tmp_path)
    for loaded in (GFSSImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, GFSSImageProcessor)
        assert loaded.image_size == 80 and loaded.pad_mode == "zero"
    config = GFSSConfig(image_size=120, pad_mode="zero")
    assert GFSSImageProcessor.from_config(config).image_size == 120


def test_load_image_from_a_file_applies_its_exif_orientation(tmp_path):
    from gfss_hf.image_processing_gfss import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write it
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)  # width x height after the rotation
    pixels = np.asarray(upright).astype(int)
    assert pixels[:10].mean() > 200 and pixels[-10:].mean() < 50  # the stored left half is now on top
