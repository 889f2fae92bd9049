"""TokenPacker-HD tiling (``image_aspect_ratio = slice``, docs/reference.md §4), host-side NumPy.

An image of h x w pixels gets a grid of r x c tiles of T x T (T = 336) chosen from a
candidate list; it is resized (aspect ratio kept) to fit r*T x c*T, placed at the top-left of
a zero canvas (zero = the mean colour once normalised) and cut into tiles row-major. With
more than one tile a global view follows, one more T x T tile (``global_view_tile``):

- ``reference_canvas`` (default): what the reference's training and evaluation code build,
  and so what every released TokenPacker-HD checkpoint saw. The whole r*T x c*T canvas,
  its zero margin included, is resized to h' x w' (the size the image itself takes when fit
  into T x T) and put at the top-left of a zero T x T tile. The image fills only part of
  h' x w' (the canvas's margin, right or bottom, is shrunk into the view, and the image is
  squeezed along that side); the rest of the tile is zero.
- ``fit_image``: the image itself resized to h' x w' at the top-left of a zero T x T tile:
  the whole image at its own aspect ratio, no canvas margin taking up view pixels. A
  deviation from the reference, available for new training (the reference's view spends
  part of its pixels on margin and distorts the image whenever the grid's aspect ratio
  differs from the image's). A checkpoint trained with one view sees different pixels, and
  answers differently, with the other, so the view is part of a run's config.

All resizing is bilinear with half-pixel centres and no antialiasing (PyTorch
``F.interpolate``), from the normalised pixels.

Each tile goes through the tower and projector on its own (g tokens per tile); the LLM sees,
per tile row, the row's tiles separated by the embedding of ',' and closed by the embedding
of '\\n', then the global view's tokens and '\\n'.

Static shapes for XLA: ``hd_tiles`` pads to ``max_tiles(patch_num)`` tiles (the largest
candidate grid plus the global view) with a validity mask, and ``hd_layout`` describes the
token sequence padded to ``max_hd_num_tokens``, so one compiled step serves every image.

Inputs are normalised float32 pixels [H, W, C] (``data.image.normalize``): the reference
normalises first and resizes after, and its zero padding is the mean colour.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TILE_SIZE = 336
# The two global views (see the module docstring); config field ``data.hd.global_view``.
REFERENCE_CANVAS, FIT_IMAGE = "reference_canvas", "fit_image"
GLOBAL_VIEWS = (REFERENCE_CANVAS, FIT_IMAGE)
# Vicuna tokenizer: ',' is 29892. The reference looks '\n' up with convert_tokens_to_ids,
# which finds no such piece (the vocab has '<0x0A>' = 13) and returns the unknown id 0;
# released HD checkpoints were trained with that, hence the default.
COMMA_TOKEN_ID = 29892
NEWLINE_TOKEN_ID = 0

# Position kinds in an HD token sequence (``HDLayout.kind``).
TILE, COMMA, NEWLINE, PAD = 0, 1, 2, 3

_PATCHES_9 = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1), (1, 5), (5, 1),
              (1, 6), (6, 1), (2, 3), (3, 2), (1, 7), (7, 1), (4, 2), (2, 4), (1, 8), (8, 1),
              (3, 3), (1, 9), (9, 1))
_PATCHES_16 = _PATCHES_9 + ((2, 5), (5, 2), (2, 6), (6, 2), (3, 4), (4, 3), (2, 7), (7, 2),
                            (3, 5), (5, 3), (2, 8), (8, 2), (4, 4))
# The duplicates (4, 6) / (6, 4) are in the reference list; the first maximum wins, so they
# never change the choice.
_PATCHES_25 = _PATCHES_16 + ((3, 6), (6, 3), (2, 9), (9, 2), (4, 5), (5, 4), (2, 10), (10, 2),
                             (3, 7), (7, 3), (11, 2), (2, 11), (4, 6), (6, 4), (12, 2), (2, 12),
                             (3, 8), (8, 3), (4, 6), (6, 4), (5, 5))
HD_CANDIDATES: dict[int, tuple[tuple[int, int], ...]] = {
    9: _PATCHES_9, 16: _PATCHES_16, 25: _PATCHES_25}


def hd_candidates(patch_num: int) -> tuple[tuple[int, int], ...]:
    """The (rows, cols) grids allowed for ``patch_num`` (9, 16 or 25), in reference order."""
    try:
        return HD_CANDIDATES[patch_num]
    except KeyError:
        raise ValueError(f"HD patch_num must be one of {sorted(HD_CANDIDATES)}, "
                         f"got {patch_num}") from None


def max_tiles(patch_num: int) -> int:
    """Tiles per image after padding: the largest candidate grid plus the global view."""
    return max(r * c for r, c in hd_candidates(patch_num)) + 1


def hd_scores(height: int, width: int, patch_num: int, tile_size: int = TILE_SIZE
              ) -> np.ndarray:
    """Score of every candidate grid (float32, in candidate order).

    score = round(h * ratio) * round(w * ratio) / (r*T * c*T) + 0.1 * IoU, with
    ratio = min(r*T / h, c*T / w) and the IoU of the boxes [0, 0, r*T, c*T] and
    [0, 0, 1.4h, 1.4w] (intersection / (union + 1e-5)). Float32 throughout, operation by
    operation as the reference computes it in PyTorch, so near-ties break the same way.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"HD tiling needs a non-empty image, got {height}x{width}")
    f32 = np.float32
    grids = np.asarray(hd_candidates(patch_num), np.int64)
    box_h, box_w = grids[:, 0] * tile_size, grids[:, 1] * tile_size
    area = (box_h * box_w).astype(f32)
    ratio = np.minimum(box_h.astype(f32) / f32(height), box_w.astype(f32) / f32(width))
    fill = np.round(f32(height) * ratio) * np.round(f32(width) * ratio) / area
    image_h, image_w = f32(height) * f32(1.4), f32(width) * f32(1.4)
    inter = (np.minimum(box_h.astype(f32), image_h) * np.minimum(box_w.astype(f32), image_w))
    union = area + image_h * image_w - inter
    iou = inter / (union + f32(1e-5))
    return (fill + iou * f32(0.1)).astype(f32)


def select_hd_grid(height: int, width: int, patch_num: int = 9,
                   tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of ``height`` x ``width`` pixels: the first
    candidate with the highest score (``hd_scores``)."""
    scores = hd_scores(height, width, patch_num, tile_size)
    return hd_candidates(patch_num)[int(np.argmax(scores))]


def fit_size(height: int, width: int, box_height: int, box_width: int) -> tuple[int, int]:
    """The reference's resized size of an image fit into a box with its aspect ratio kept:
    the tighter side fills the box, the other is rounded (half to even) and capped."""
    h_ratio, w_ratio = box_height / height, box_width / width
    if h_ratio <= w_ratio:
        return box_height, min(box_width, round(width * h_ratio))
    return min(box_height, round(height * w_ratio)), box_width


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and float32 weights of a half-pixel bilinear resize along one axis,
    with PyTorch's CPU index arithmetic (float32 scale and source positions)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = np.clip(src - lower.astype(np.float32), 0, 1).astype(np.float32)
    return lower, upper, frac


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, C] -> float32 [h, w, C], PyTorch ``F.interpolate(mode='bilinear',
    align_corners=False)`` (half-pixel centres, no antialiasing, also when shrinking)."""
    image = np.asarray(image, np.float32)
    top, bottom, fy = _axis_weights(image.shape[0], size[0])
    left, right, fx = _axis_weights(image.shape[1], size[1])
    fy, fx = fy[:, None, None], fx[None, :, None]
    rows = image[top] * (1 - fy) + image[bottom] * fy
    return (rows[:, left] * (1 - fx) + rows[:, right] * fx).astype(np.float32)


def _fit_on_canvas(image: np.ndarray, box_height: int, box_width: int,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """``image`` resized to ``size`` (default: ``fit_size`` into the box) at the top-left of
    a zero canvas of the box's size."""
    height, width = image.shape[:2]
    size = size or fit_size(height, width, box_height, box_width)
    canvas = np.zeros((box_height, box_width, image.shape[2]), np.float32)
    canvas[:size[0], :size[1]] = resize_bilinear(image, size)
    return canvas


def hd_canvas(image: np.ndarray, grid: tuple[int, int], tile_size: int = TILE_SIZE
              ) -> np.ndarray:
    """The image fit into rows*T x cols*T, top-left on a zero canvas: [r*T, c*T, C]."""
    rows, cols = grid
    return _fit_on_canvas(image, rows * tile_size, cols * tile_size)


def check_global_view(view: str) -> str:
    """``view`` if it names a global view, else ValueError listing them."""
    if view not in GLOBAL_VIEWS:
        raise ValueError(f"HD global view must be one of {GLOBAL_VIEWS}, got {view!r}")
    return view


def global_view_tile(image: np.ndarray, canvas: np.ndarray, view: str = REFERENCE_CANVAS,
                     tile_size: int = TILE_SIZE) -> np.ndarray:
    """The global view of ``image`` [H, W, C] tiled on ``canvas`` [r*T, c*T, C]: [T, T, C].

    Both views are h' x w' = ``fit_size(H, W, T, T)`` pixels at the top-left of a zero tile;
    ``reference_canvas`` resizes the canvas (margin included) to h' x w', ``fit_image`` the
    image itself (see the module docstring).
    """
    size = fit_size(image.shape[0], image.shape[1], tile_size, tile_size)
    source = canvas if check_global_view(view) == REFERENCE_CANVAS else image
    return _fit_on_canvas(source, tile_size, tile_size, size)


@dataclasses.dataclass(frozen=True)
class HDTiles:
    """One image's tiles padded to a fixed count.

    pixels: float32 [max_tiles, T, T, C]: the r*c tiles row-major, then the global view
      (if r*c > 1), then zero tiles.
    mask: bool [max_tiles], True for real tiles (r*c, plus 1 with a global view).
    grid: (rows, cols).
    """

    pixels: np.ndarray
    mask: np.ndarray
    grid: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return int(self.mask.sum())


def hd_tiles(image: np.ndarray, patch_num: int = 9, *, tile_size: int = TILE_SIZE,
             num_slots: int | None = None, global_view: str = REFERENCE_CANVAS
             ) -> HDTiles:
    """Tiles of a normalised image [H, W, C] for TokenPacker-HD.

    Args:
      image: normalised float pixels [H, W, C].
      patch_num: candidate list (9, 16 or 25).
      tile_size: T.
      num_slots: tiles after padding (default ``max_tiles(patch_num)``; at least the real
        count).
      global_view: ``reference_canvas`` or ``fit_image`` (see ``global_view_tile``).
    """
    height, width, channels = image.shape
    rows, cols = select_hd_grid(height, width, patch_num, tile_size)
    canvas = hd_canvas(image, (rows, cols), tile_size)
    tiles = canvas.reshape(rows, tile_size, cols, tile_size, channels).transpose(0, 2, 1, 3, 4)
    tiles = list(tiles.reshape(rows * cols, tile_size, tile_size, channels))
    if rows * cols > 1:
        tiles.append(global_view_tile(image, canvas, global_view, tile_size))
    num_slots = max_tiles(patch_num) if num_slots is None else num_slots
    if num_slots < len(tiles):
        raise ValueError(f"HD tiling: a {rows}x{cols} grid needs {len(tiles)} tile slots, "
                         f"only {num_slots} given")
    pixels = np.zeros((num_slots, tile_size, tile_size, channels), np.float32)
    pixels[:len(tiles)] = np.stack(tiles)
    mask = np.arange(num_slots) < len(tiles)
    return HDTiles(pixels, mask, (rows, cols))


def hd_num_tokens(rows: int, cols: int, tokens_per_tile: int) -> int:
    """LLM positions of one HD image: n*g + r*(c-1) commas + r newlines, plus g + 1 for the
    global view and its newline when n = r*c > 1."""
    tiles = rows * cols
    count = tiles * tokens_per_tile + rows * (cols - 1) + rows
    return count + (tokens_per_tile + 1 if tiles > 1 else 0)


def max_hd_num_tokens(patch_num: int, tokens_per_tile: int) -> int:
    """The most positions any image can take with this candidate list (static length)."""
    return max(hd_num_tokens(r, c, tokens_per_tile) for r, c in hd_candidates(patch_num))


@dataclasses.dataclass(frozen=True)
class HDLayout:
    """Where each LLM position of an HD image comes from (padded to a static length).

    kind: int8 [L]: TILE, COMMA, NEWLINE or PAD.
    tile_token: int32 [L]: for TILE positions, the index into the tile tokens flattened as
      [num_slots * g] (tile t, token k -> t * g + k, the global view being tile r*c);
      0 elsewhere.
    length: positions in use (``hd_num_tokens``); the rest are PAD.
    """

    kind: np.ndarray
    tile_token: np.ndarray
    length: int

    def token_ids(self, comma_id: int = COMMA_TOKEN_ID, newline_id: int = NEWLINE_TOKEN_ID,
                  fill: int = -1) -> np.ndarray:
        """int32 [L]: the separator token ids at COMMA / NEWLINE positions, ``fill`` elsewhere
        (embed these, and take the tile features at TILE positions)."""
        ids = np.full(self.kind.shape, fill, np.int32)
        ids[self.kind == COMMA] = comma_id
        ids[self.kind == NEWLINE] = newline_id
        return ids


def hd_layout(rows: int, cols: int, tokens_per_tile: int, length: int | None = None
              ) -> HDLayout:
    """The token layout of an r x c HD image, padded to ``length`` (default: unpadded)."""
    used = hd_num_tokens(rows, cols, tokens_per_tile)
    length = used if length is None else length
    if length < used:
        raise ValueError(f"HD layout: a {rows}x{cols} grid at {tokens_per_tile} tokens per "
                         f"tile needs {used} positions, only {length} given")
    kind = np.full(length, PAD, np.int8)
    tile_token = np.zeros(length, np.int32)
    tile_range = np.arange(tokens_per_tile, dtype=np.int32)
    pos = 0

    def put_tile(tile: int):
        nonlocal pos
        kind[pos:pos + tokens_per_tile] = TILE
        tile_token[pos:pos + tokens_per_tile] = tile * tokens_per_tile + tile_range
        pos += tokens_per_tile

    def put(separator: int):
        nonlocal pos
        kind[pos] = separator
        pos += 1

    for row in range(rows):
        for col in range(cols):
            put_tile(row * cols + col)
            if col < cols - 1:
                put(COMMA)
        put(NEWLINE)
    if rows * cols > 1:
        put_tile(rows * cols)
        put(NEWLINE)
    assert pos == used
    return HDLayout(kind, tile_token, used)
