"""TokenPacker-HD tiling (docs/reference.md §4): grid choice, canvas, tiles, global view,
token layout."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tokenpacker_jax.data import hd
from tokenpacker_jax.data.conversation import ConversationTokenizer
from tokenpacker_jax.data.example import ExampleBuilder, ImageSettings

from data_helpers import reference_fit, reference_slice

T = hd.TILE_SIZE


@pytest.mark.parametrize("height,width,grid9,grid16", [
    (480, 640, (2, 3), (3, 4)),
    (1080, 1920, (2, 4), (3, 5)),
    (1000, 1000, (3, 3), (4, 4)),
])
def test_select_hd_grid_figures(height, width, grid9, grid16):
    assert hd.select_hd_grid(height, width, 9) == grid9
    assert hd.select_hd_grid(height, width, 16) == grid16


def test_token_count_figures():
    assert hd.hd_num_tokens(1, 1, 144) == 145
    assert [hd.hd_num_tokens(3, 3, g) for g in (144, 64, 36)] == [1450, 650, 370]
    assert [hd.hd_num_tokens(4, 4, g) for g in (144, 64, 36)] == [2465, 1105, 629]
    assert hd.max_hd_num_tokens(9, 144) == 1450
    assert (hd.max_tiles(9), hd.max_tiles(16), hd.max_tiles(25)) == (10, 17, 26)


def test_candidate_lists():
    assert len(hd.hd_candidates(9)) == 23 and hd.hd_candidates(9)[-3:] == ((3, 3), (1, 9), (9, 1))
    assert hd.hd_candidates(16)[:23] == hd.hd_candidates(9)
    assert hd.hd_candidates(16)[23:] == ((2, 5), (5, 2), (2, 6), (6, 2), (3, 4), (4, 3), (2, 7),
                                         (7, 2), (3, 5), (5, 3), (2, 8), (8, 2), (4, 4))
    assert hd.hd_candidates(25)[:36] == hd.hd_candidates(16)
    assert len(hd.hd_candidates(25)) == 57 and hd.hd_candidates(25).count((4, 6)) == 2
    assert all(r * c <= 9 for r, c in hd.hd_candidates(9))
    with pytest.raises(ValueError, match="patch_num must be one of"):
        hd.hd_candidates(12)


def torch_scores(sizes, candidates):
    """The score of docs/reference.md §4.1 written with torch integer boxes, as the reference
    computes it: [len(sizes), len(candidates)] float32."""
    boxes = torch.tensor([[0, 0, r * T, c * T] for r, c in candidates])[None]
    image = torch.tensor([[0, 0, h, w] for h, w in sizes])[:, None]
    height, width = image[..., 2], image[..., 3]
    ratio = (boxes[..., 2:] / image[..., 2:]).min(dim=-1).values
    area = boxes[..., 2] * boxes[..., 3]
    fill = torch.round(height * ratio) * torch.round(width * ratio) / area
    scaled = image * 1.4
    inter = (torch.minimum(boxes[..., 2], scaled[..., 2])
             * torch.minimum(boxes[..., 3], scaled[..., 3]))
    union = area + scaled[..., 2] * scaled[..., 3] - inter
    return fill + inter / (union + 1e-5) * 0.1


def test_scores_match_torch_float32_arithmetic():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(20, 4000, size=(300, 2))]
    sizes += [(336, 336), (672, 1008), (1, 5000), (5000, 1)]
    for patch_num in (9, 16, 25):
        candidates = hd.hd_candidates(patch_num)
        expected = torch_scores(sizes, candidates)
        assert expected.dtype == torch.float32
        for (height, width), scores in zip(sizes, expected, strict=True):
            np.testing.assert_array_equal(hd.hd_scores(height, width, patch_num), scores.numpy())
            assert hd.select_hd_grid(height, width, patch_num) == \
                candidates[int(torch.argmax(scores))], (height, width, patch_num)


@pytest.mark.parametrize("size", [(50, 70), (17, 23), (336, 448), (5, 3)])
def test_resize_matches_torch_interpolate(size):
    image = np.random.default_rng(size[0]).normal(size=(40, 31, 3)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=size,
                             mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    ours = hd.resize_bilinear(image, size)
    assert ours.dtype == np.float32 and ours.shape == (*size, 3)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_fit_size_follows_the_reference():
    assert hd.fit_size(480, 640, 2 * T, 3 * T) == (672, 896)  # height fills, width rounded
    assert hd.fit_size(1080, 1920, 2 * T, 4 * T) == (672, 1195)
    assert hd.fit_size(480, 640, T, T) == (252, 336)
    assert hd.fit_size(1000, 1000, 3 * T, 3 * T) == (1008, 1008)


@pytest.fixture(scope="module")
def image_480x640():
    return np.random.default_rng(0).normal(size=(480, 640, 3)).astype(np.float32)


def test_canvas_tiles_and_global_view(image_480x640):
    image = image_480x640
    tiles = hd.hd_tiles(image, 9)
    assert tiles.grid == (2, 3)
    assert tiles.pixels.shape == (10, T, T, 3) and tiles.pixels.dtype == np.float32
    assert tiles.mask.tolist() == [True] * 7 + [False] * 3 and tiles.num_tiles == 7

    canvas = hd.hd_canvas(image, (2, 3))
    assert canvas.shape == (2 * T, 3 * T, 3)
    np.testing.assert_array_equal(canvas[:, :896], hd.resize_bilinear(image, (672, 896)))
    assert not canvas[:, 896:].any()  # zero = the mean colour after normalisation
    for row in range(2):
        for col in range(3):
            np.testing.assert_array_equal(tiles.pixels[row * 3 + col],
                                          canvas[row * T:(row + 1) * T, col * T:(col + 1) * T])
    assert not tiles.pixels[7:].any()


def test_global_views(image_480x640):
    canvas = hd.hd_canvas(image_480x640, (2, 3))
    # reference_canvas, the default: the padded canvas resized to the image's own fit into
    # one tile (252 x 336), so the canvas's right margin ends up in the view.
    glob = hd.hd_tiles(image_480x640, 9).pixels[6]
    np.testing.assert_array_equal(
        glob, hd.hd_tiles(image_480x640, 9, global_view="reference_canvas").pixels[6])
    np.testing.assert_array_equal(glob[:252], hd.resize_bilinear(canvas, (252, 336)))
    assert not glob[252:].any()
    assert np.abs(glob[:252, -20:]).max() < 1e-6 < np.abs(glob[:252, :290]).max()
    # fit_image: the image itself at that size.
    fit = hd.hd_tiles(image_480x640, 9, global_view="fit_image").pixels[6]
    np.testing.assert_array_equal(fit[:252], hd.resize_bilinear(image_480x640, (252, 336)))
    assert not fit[252:].any()
    assert np.abs(glob - fit).max() > 0.5
    with pytest.raises(ValueError, match="global view must be one of"):
        hd.hd_tiles(image_480x640, 9, global_view="canvas")


class _NoText:
    """The tokenizer an ExampleBuilder needs; nothing is tokenised here."""

    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text):
        raise AssertionError("no text in these tests")


# (height, width, patch_num) of the comparisons with the reference's slice preprocessing
# (data_helpers.reference_slice); the canvas margin is on the right where the image fills the
# grid's height, at the bottom where it fills its width.
REFERENCE_CASES = [(480, 640, 9), (640, 480, 9), (550, 670, 9), (300, 1000, 16),
                   (1000, 300, 9), (1080, 1920, 16), (700, 500, 16)]


def test_reference_cases_cover_both_margins():
    margins = set()
    for height, width, patch_num in REFERENCE_CASES:
        rows, cols = hd.hd_candidates(patch_num)[
            int(torch.argmax(torch_scores([(height, width)], hd.hd_candidates(patch_num))[0]))]
        fit = reference_fit(height, width, rows * T, cols * T)
        assert rows * cols > 1
        margins.add("right" if fit[1] < cols * T else "bottom" if fit[0] < rows * T else "-")
    assert {"right", "bottom"} <= margins


@pytest.mark.parametrize("view", ["reference_canvas", "fit_image"])
@pytest.mark.parametrize("height,width,patch_num", REFERENCE_CASES)
def test_tiles_and_global_view_equal_the_reference_code(height, width, patch_num, view):
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3),
                                                             dtype=np.uint8)
    candidates = hd.hd_candidates(patch_num)
    grid = candidates[int(torch.argmax(torch_scores([(height, width)], candidates)[0]))]
    expected, view_size = reference_slice(pixels, grid, view, tile=T)
    settings = ImageSettings(mode="slice", size=T, patch_num=patch_num, global_view=view)
    builder = ExampleBuilder(ConversationTokenizer("plain", _NoText()), settings, 4, 64)
    ours, mask, _, _ = builder.image_tiles(Image.fromarray(pixels))
    count = grid[0] * grid[1] + 1
    assert mask.tolist() == [True] * count + [False] * (len(mask) - count)
    np.testing.assert_allclose(ours[:count], expected, atol=1e-5, rtol=0)
    assert not ours[count:].any()
    # The view is h' x w' on a zero tile; the reference's carries the canvas margin inside.
    glob = ours[count - 1]
    assert not glob[view_size[0]:].any() and not glob[:, view_size[1]:].any()
    if view == "reference_canvas":
        canvas_fit = reference_fit(height, width, grid[0] * T, grid[1] * T)
        if canvas_fit[1] < grid[1] * T:  # margin on the right: the view's last columns
            assert np.abs(glob[:view_size[0], view_size[1] - 2:view_size[1]]).max() < 1e-6
        else:  # margin at the bottom: the view's last rows
            assert np.abs(glob[view_size[0] - 2:view_size[0], :view_size[1]]).max() < 1e-6


def test_single_tile_has_no_global_view():
    image = np.ones((336, 300, 3), np.float32)
    tiles = hd.hd_tiles(image, 9, num_slots=3)
    assert tiles.grid == (1, 1) and tiles.mask.tolist() == [True, False, False]
    np.testing.assert_array_equal(tiles.pixels[0, :, :300], 1.0)
    assert not tiles.pixels[0, :, 300:].any() and not tiles.pixels[1:].any()
    with pytest.raises(ValueError, match="needs 7 tile slots, only 4"):
        hd.hd_tiles(np.ones((480, 640, 3), np.float32), 9, num_slots=4)


def test_layout_of_a_2x3_grid():
    g = 2
    layout = hd.hd_layout(2, 3, g, length=24)
    t, c, n, p = hd.TILE, hd.COMMA, hd.NEWLINE, hd.PAD
    row = [t, t, c, t, t, c, t, t, n]
    assert layout.kind.tolist() == row + row + [t, t, n] + [p] * 3
    assert layout.length == hd.hd_num_tokens(2, 3, g) == 21
    tiles_at = layout.tile_token[layout.kind == t]
    assert tiles_at.tolist() == list(range(7 * g))  # tiles row-major, then the global view
    ids = layout.token_ids()
    assert ids[2] == 29892 and ids[8] == 0 and ids[0] == -1 and ids[-1] == -1
    assert hd.hd_layout(2, 3, g).token_ids(comma_id=11, newline_id=13)[[2, 8, 20]].tolist() == \
        [11, 13, 13]


def test_layout_counts_match_token_counts():
    for patch_num in (9, 16):
        for rows, cols in hd.hd_candidates(patch_num):
            for g in (144, 36):
                layout = hd.hd_layout(rows, cols, g, length=hd.max_hd_num_tokens(patch_num, g))
                kinds = np.bincount(layout.kind, minlength=4)
                n = rows * cols
                assert kinds[hd.TILE] == (n + (n > 1)) * g
                assert kinds[hd.COMMA] == rows * (cols - 1)
                assert kinds[hd.NEWLINE] == rows + (n > 1)
                assert layout.length == hd.hd_num_tokens(rows, cols, g)
    with pytest.raises(ValueError, match="needs 1450 positions"):
        hd.hd_layout(3, 3, 144, length=1000)
