"""Per-step gradient pictures for MLflow's image grid, drawn from arrays with numpy and Pillow.

Plain host data in, a :class:`PIL.Image.Image` out: no matplotlib (about 50 ms and several MB of figure state per
picture), no MLflow, no Lightning. Each picture is an ``uint8`` RGB array filled with numpy (bars and heatmap
cells are array slices, colours come from :data:`COLORMAP`, a 256-entry lookup table) and labelled with Pillow's
built-in font, so that one picture of 200 parameters takes a few milliseconds (``python -m benchmarks.images``).

:func:`gradient_norms_image`: per-parameter gradient norms at one step, before and after clipping.
:func:`gradient_histograms_image`: the gradient distributions of the largest parameters over the steps so far.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis at 9 evenly spaced points (matplotlib's table, rounded), interpolated to 256 entries.
_VIRIDIS_ANCHORS = np.array(
    [
        [68, 1, 84],
        [71, 44, 122],
        [59, 81, 139],
        [44, 113, 142],
        [33, 144, 141],
        [39, 173, 129],
        [92, 200, 99],
        [170, 220, 50],
        [253, 231, 37],
    ],
    dtype=float,
)
COLORMAP: np.ndarray = np.stack(
    [np.interp(np.linspace(0, 8, 256), np.arange(9), _VIRIDIS_ANCHORS[:, c]) for c in range(3)], axis=1
).astype(np.uint8)
"""Viridis as a ``(256, 3)`` uint8 lookup table: ``COLORMAP[index]`` colours values scaled to 0..255."""

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)
BEFORE_CLIPPING = (253, 174, 97)  # orange: the part of a norm that clipping removed
AFTER_CLIPPING = (49, 104, 142)  # blue: the norm the optimizer used
UNCLIPPED = (150, 150, 150)  # grey: a parameter outside every clip group
MAX_HISTOGRAM_PARAMETERS = 4
MAX_HISTOGRAM_STEPS = 200
WIDTH = 720
PNG_COMPRESS_LEVEL = 1  # zlib level of the staged PNGs: a third of the time of level 6, a few per cent larger


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size)


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int, upright: bool = False) -> Image.Image:
    """``text`` rendered once as a greyscale mask (font rendering is most of a picture's time; names repeat)."""
    left, top, right, bottom = _font(size).getbbox(text)
    mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=_font(size))
    return mask.rotate(90, expand=True) if upright else mask


def _write(image: Image.Image, xy: tuple[int, int], text: str, size: int = 10, anchor: str = "la") -> None:
    """Paste ``text`` at ``xy``; ``anchor``: horizontal ``l``/``m``/``r``, vertical ``a`` (top)/``m``/``d``
    (bottom) of the text's box; a ``u`` after them sets it upright (reading upwards)."""
    mask = _text_mask(text, size, anchor.endswith("u"))
    width, height = mask.size
    x = xy[0] - {"l": 0, "m": width // 2, "r": width}[anchor[0]]
    y = xy[1] - {"a": 0, "m": height // 2, "d": height}[anchor[1]]
    image.paste(INK, (x, y), mask)


def _log10(values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(values) & (values > 0), np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _decades(logs: np.ndarray) -> tuple[int, int]:
    """The whole powers of ten around the finite values of ``logs`` (at least one decade apart)."""
    finite = logs[np.isfinite(logs)]
    if not finite.size:
        return -1, 0
    low, high = math.floor(finite.min()), math.ceil(finite.max())
    return low, max(high, low + 1)


def short_name(name: str, limit: int = 22) -> str:
    """``name`` cut in the middle to ``limit`` characters (its start and its end are what tell parameters apart)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head) :]


def gradient_norms_image(
    names: Sequence[str],
    before: Sequence[float],
    after: Sequence[float],
    title: str,
    clipped: Sequence[bool] | None = None,
) -> Image.Image:
    """Per-parameter gradient L2 norms at one step: one bar per parameter, on a log scale.

    The blue bar is the norm after clipping (what the optimizer used), the orange bar behind it the norm before
    clipping: an orange tip is what clipping removed. Parameters are in the module's order from left to right
    (at least 3 pixels per bar; the picture widens beyond 200 parameters); every parameter is named when the
    names fit, else every n-th (below the bars). ``clipped[i]`` False draws parameter ``i`` grey (outside
    every clip group); non-finite or zero norms leave the bar empty.

    Args:
        names: Parameter names, in the module's order.
        before: Norms before clipping (after noise and multipliers), one per name.
        after: Norms after clipping, one per name.
        title: The line above the bars (the run, the key and the step).
        clipped: Whether each parameter is subject to clipping. Default: all.

    Returns:
        An RGB picture ``max(720, 3 * len(names) + 90)`` pixels wide and 378 high.
    """
    count = len(names)
    before_logs, after_logs = _log10(np.asarray(before, float)), _log10(np.asarray(after, float))
    if len(before_logs) != count or len(after_logs) != count:
        raise ValueError(
            f"gradient_norms_image: {count} names but {len(before_logs)} norms before and {len(after_logs)} after."
        )
    low, high = _decades(np.concatenate([before_logs, after_logs]))
    left, top, plot_height, label_height = 60, 28, 220, 130
    bar = max(3, min(40, (WIDTH - left - 30) // max(count, 1)))
    width = max(WIDTH, left + bar * count + 30)
    pixels = np.full((top + plot_height + label_height, width, 3), 255, dtype=np.uint8)  # white
    bottom = top + plot_height

    def height_of(logs: np.ndarray) -> np.ndarray:
        fraction = np.nan_to_num((logs - low) / (high - low), nan=0.0)
        return np.clip(np.round(fraction * plot_height), 0, plot_height).astype(int)

    for decade in range(low, high + 1):
        row = bottom - round((decade - low) / (high - low) * plot_height)
        pixels[max(row - 1, top) : row + 1, left:-30] = GRID
    # Column x of the plot shows parameter (x - left) // bar; a gap of one pixel between bars wider than 3.
    columns = np.arange(bar * count)
    parameter = columns // bar
    drawn = columns % bar < bar - (1 if bar > 3 else 0)
    rows = np.arange(plot_height)[::-1, None]  # height above the bottom line
    area = pixels[top:bottom, left : left + bar * count]
    area[(rows < height_of(before_logs)[parameter]) & drawn] = BEFORE_CLIPPING
    after_colour = np.tile(np.asarray(AFTER_CLIPPING, np.uint8), (count, 1))
    if clipped is not None:
        after_colour[~np.asarray(clipped, bool)] = UNCLIPPED
    after_mask = (rows < height_of(after_logs)[parameter]) & drawn
    area[after_mask] = np.broadcast_to(after_colour[parameter], area.shape)[after_mask]
    image = Image.fromarray(pixels)
    _write(image, (left, 8), title, 13)
    for decade in range(low, high + 1):
        row = bottom - round((decade - low) / (high - low) * plot_height)
        _write(image, (left - 6, row), f"1e{decade}", anchor="rm")
    every = max(1, math.ceil(12 / bar))  # an upright label needs about 12 pixels across
    for i in range(0, count, every):
        _write(image, (left + i * bar + bar // 2, bottom + 4), short_name(names[i]), anchor="mau")
    legend = f"orange: before clipping, blue: after (log scale){', grey: not clipped' if clipped is not None else ''}"
    _write(image, (width - 30, 8), legend, anchor="ra")
    return image


def rebin(edges: Sequence[Sequence[float]], counts: Sequence[Sequence[int]], reach: float, bins: int) -> np.ndarray:
    """Histograms with equal bins over their own ``[edges[0], edges[-1]]`` as fractions of ``bins`` equal cells
    over ``[-reach, reach]``, elements spread uniformly within a bin: ``(len(counts), bins)``, rows summing to 1
    (a histogram whose elements all share one value puts them in that value's cell)."""
    counts_array = np.asarray(counts, float)
    low, high = np.asarray([row[0] for row in edges], float), np.asarray([row[-1] for row in edges], float)
    width = counts_array.shape[1]
    cumulative = np.concatenate([np.zeros((len(counts_array), 1)), np.cumsum(counts_array, axis=1)], axis=1)
    cell_edges = np.linspace(-reach, reach, bins + 1)
    span = np.where(high > low, high - low, 1.0)
    position = np.clip((cell_edges[None, :] - low[:, None]) / span[:, None] * width, 0, width)
    whole = np.minimum(position.astype(int), width - 1)
    rows = np.arange(len(counts_array))[:, None]
    below = cumulative[rows, whole] + (position - whole) * counts_array[rows, whole]
    equal = np.where(cell_edges[None, :] > low[:, None], cumulative[:, -1:], 0.0)  # one value: its cell
    equal[:, -1] = cumulative[:, -1]  # (the last cell includes its upper edge)
    below = np.where((high == low)[:, None], equal, below)
    grid = np.diff(below, axis=1)
    return grid / np.maximum(cumulative[:, -1:], 1.0)


def gradient_histograms_image(
    history: dict[str, list[tuple[int, Sequence[float | None], Sequence[int]]]], title: str, bins: int = 64
) -> Image.Image:
    """The gradient distributions of a few parameters over the logged steps so far: one heatmap per parameter.

    Each column is one logged step's histogram, re-binned onto ``bins`` rows of a value range symmetric about
    zero (``±`` the largest ``|gradient|`` of that parameter so far; zero is the middle row, marked by a tick);
    the colour is the log of the fraction of the parameter's elements in a cell (:data:`COLORMAP`, white:
    none). In MLflow's step slider the picture grows to the right, so one picture shows how the distribution
    moved up to that step.

    Args:
        history: ``{parameter name: [(step, edges, counts), ...]}`` in step order (edges as in
            :class:`~lightning_optloss.gradients.histograms.Histogram`; ``None`` edges are skipped).
        title: The line above the heatmaps.
        bins: Rows of each heatmap.

    Returns:
        An RGB picture 720 pixels wide, ``34 + 100 * len(history)`` high.
    """
    left, top, panel, gap = 60, 28, 80, 20
    columns = WIDTH - left - 30
    pixels = np.full((top + len(history) * (panel + gap) + 6, WIDTH, 3), 255, dtype=np.uint8)  # white
    labels: list[tuple[int, str, float, int, int]] = []
    for position, (param, rows) in enumerate(history.items()):
        rows = [row for row in rows if row[1] and row[1][0] is not None]
        y0 = top + position * (panel + gap) + 14
        if not rows:
            labels.append((y0, param, 0.0, 0, 0))
            continue
        reach = max(max(abs(row[1][0]), abs(row[1][-1])) for row in rows) or 1.0
        grid = rebin([row[1] for row in rows], [row[2] for row in rows], reach, bins).T
        with np.errstate(divide="ignore"):
            logs = np.log10(grid)
        shown = np.isfinite(logs)
        floor = max(logs[shown].min(), -6.0) if shown.any() else -6.0
        scaled = np.where(shown, np.clip((logs - floor) / max(-floor, 1e-9) * 255, 0, 255), -1)
        # Columns of equal width (each logged step), largest values on top.
        spread = np.minimum((np.arange(columns) * len(rows)) // columns, len(rows) - 1)
        cells = np.minimum((np.arange(panel) * bins) // panel, bins - 1)
        index = scaled[::-1][cells][:, spread]
        pixels[y0 : y0 + panel, left : left + columns] = np.where(
            (index >= 0)[..., None], COLORMAP[np.maximum(index, 0).astype(np.uint8)], 255
        )
        labels.append((y0, param, reach, rows[0][0], rows[-1][0]))
    image = Image.fromarray(pixels)
    _write(image, (left, 8), title, 13)
    for y0, param, reach, first, last in labels:
        _write(image, (left, y0 - 3), param, anchor="ld")
        if not reach:
            _write(image, (left + 4, y0 + 4), "no finite gradient yet")
            continue
        _write(image, (left + columns, y0 - 3), f"steps {first} to {last}", anchor="rd")
        _write(image, (left - 4, y0), f"{reach:+.1e}", anchor="ra")
        _write(image, (left - 4, y0 + panel // 2), "0 -", anchor="rm")
        _write(image, (left - 4, y0 + panel), f"{-reach:+.1e}", anchor="rd")
    return image
