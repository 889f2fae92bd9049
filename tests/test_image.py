"""Image preprocessing against transformers' CLIPImageProcessor and docs/reference.md §2."""

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from tokenpacker_jax.data import image as image_lib

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def processor():
    # The PIL backend is transformers' reference CLIP processor (the default one needs
    # torchvision); sizes as for CLIP ViT-L/14-336.
    return CLIPImageProcessorPil(size={"shortest_edge": 336},
                                 crop_size={"height": 336, "width": 336})


def _reference(processor, image):
    return processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)


def _rgb(height, width):
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("height,width", [(251, 333), (401, 17), (480, 640), (336, 336),
                                          (1, 1), (3, 5), (337, 335)])
def test_square_mode_matches_clip_processor_on_odd_sizes(processor, height, width):
    image = _rgb(height, width)
    np.testing.assert_allclose(image_lib.preprocess(image), _reference(processor, image),
                               atol=1e-5)


def _mode_images():
    rgb = _rgb(97, 131)
    palette_transparent = rgb.convert("P")
    palette_transparent.info["transparency"] = 3
    return {
        "L": Image.fromarray(RNG.integers(0, 256, (97, 131), dtype=np.uint8), "L"),
        "RGBA": Image.fromarray(RNG.integers(0, 256, (97, 131, 4), dtype=np.uint8), "RGBA"),
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "CMYK": rgb.convert("CMYK"),
        "LA": rgb.convert("LA"),
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "P+transparency", "CMYK", "LA"])
def test_every_pil_mode_matches_clip_processor(processor, mode):
    image = _mode_images()[mode]
    np.testing.assert_allclose(image_lib.preprocess(image), _reference(processor, image),
                               atol=1e-5)


def test_16_bit_grey_is_rescaled_not_clipped(processor):
    # transformers clips I;16 values to 255 (almost white); we map 0..65535 to 0..255, so an
    # image of v * 257 must equal the 8-bit image of v.
    grey = RNG.integers(0, 256, (61, 90)).astype(np.uint16)
    sixteen = Image.fromarray(grey * 257, "I;16")
    assert sixteen.mode == "I;16"
    eight = Image.fromarray(grey.astype(np.uint8), "L")
    np.testing.assert_allclose(image_lib.preprocess(sixteen), _reference(processor, eight),
                               atol=1e-5)


def test_extreme_aspect_ratio_crops_before_resizing(processor):
    # 3 x 4000 would be resized to 336 x 448000 first; we resample only the cropped part.
    image = _rgb(3, 4000)
    ours = image_lib.preprocess(image)
    assert ours.shape == (336, 336, 3) and ours.dtype == np.float32
    # Same sampling positions, so at most one 8-bit level apart from the full resize.
    one_level = 1 / 255 / min(image_lib.CLIP_STD)
    assert np.abs(ours - _reference(processor, image)).max() <= one_level + 1e-5


def _pad_mode_from_spec(image, size=336):
    """docs/reference.md §2 pad mode, written out: canvas of (122, 116, 104), image centred,
    then resize."""
    width, height = image.size
    side = max(width, height)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = (122, 116, 104)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = np.asarray(image)
    resized = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC))
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    return ((resized / 255.0 - mean) / std).astype(np.float32)


@pytest.mark.parametrize("height,width", [(120, 333), (401, 90), (50, 50)])
def test_pad_mode_follows_spec(height, width):
    image = _rgb(height, width)
    np.testing.assert_allclose(image_lib.preprocess(image, mode="pad"),
                               _pad_mode_from_spec(image), atol=1e-5)


def test_pad_colour_is_the_reference_mean_colour():
    assert image_lib.mean_colour(image_lib.CLIP_MEAN) == (122, 116, 104)
    padded = image_lib.preprocess(Image.new("RGB", (10, 400), (0, 0, 0)), mode="pad")
    corner = padded[0, 0] * np.array(image_lib.CLIP_STD) + np.array(image_lib.CLIP_MEAN)
    np.testing.assert_allclose(corner * 255, (122, 116, 104), atol=1e-3)


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(image_lib.ImageError, match="missing.png"):
        image_lib.load_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(image_lib.ImageError, match="corrupt.jpg"):
        image_lib.load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    _rgb(64, 64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(image_lib.ImageError, match="truncated.png"):
        image_lib.load_image(truncated)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="slice"):
        image_lib.preprocess(_rgb(8, 8), mode="slice")


def test_hd_grid_selection_is_public_here():
    # Re-exported beside the other modes; the implementation and its tests are in data/hd.py.
    assert image_lib.select_hd_grid(480, 640, 9) == (2, 3)
    assert image_lib.select_hd_grid(1000, 1000, 16) == (4, 4)
