r"""Pictures of attribution maps (docs/maths.md, 'Visualisation'; paper App. F.1, Figures 1, 6).

For an attribution ``A`` of one image (``C x H x W``):

1. Channel sum:   ``m[i, j] = sum_c A[c, i, j]``  (a single-channel input has nothing to sum).
2. Clip outliers: ``lo, hi = P_0.5(m), P_99.5(m)`` (``numpy.percentile``, linear interpolation,
   over the H*W values of this one map); ``m~ = clip(m, lo, hi)``. As in the authors'
   ``utils.preprocess``, clipping never moves a value across zero: when ``lo > 0`` the values
   below ``lo`` become 0 rather than ``lo`` (and, mirrored, when ``hi < 0`` the values above
   ``hi`` become 0), so zero attribution stays exactly zero. Otherwise this is plain clipping.
3. Colour, symmetric about zero (the authors' ``pixel_range``: ``[-v, v]`` with ``bwr``):
   ``v = max |m~|``, ``s = m~ / v`` in ``[-1, 1]`` (``s = 0`` everywhere when ``v = 0``: an
   all-zero map is a blank, neutral picture, never a division by zero), and the pixel colour is
   ``cmap((s + 1) / 2)``. With the default diverging ``"bwr"`` map zero is exactly white, positive
   is red and negative blue; a map that is all ``>= 0`` (RectGrad, by construction) uses only
   the white-to-red half, so its strength reads the same as in a signed map. ``symmetric=False``
   instead stretches ``[min, max]`` over the whole colour map (for sequential maps such as
   ``"hot"``), and then zero is not special.
4. Overlay: ``w = alpha * |s|``, ``pixel = (1 - w) * gray(image) + w * colour``: where the
   attribution is 0 the (grayscale) photo shows through unchanged.

Hidden-layer maps (Figure 6) are the *channel mean* of the attribution at that layer, then
steps 2-3. Each map is scaled to its own ``max |value|``: maps are compared by shape, not by
absolute size, as in the paper's figures.

Grids are laid out in pixels: every panel is upscaled by a whole factor with nearest-neighbour
(so a 32x32 CIFAR input becomes crisp 160x160 blocks and a 224x224 input is drawn 1:1), pasted
onto one canvas, and matplotlib (Agg canvas, no pyplot, imported only when a grid is drawn)
writes the labels. ``import rectonnx.visualize`` imports only numpy.
"""
from __future__ import annotations

import math
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "attribution_to_map",
    "channel_mean_map",
    "scale_map",
    "heatmap_rgb",
    "overlay_rgb",
    "save_png",
    "method_grid",
    "method_grid_many",
    "layer_maps_grid",
]

DEFAULT_CLIP = (0.5, 99.5)
_MIN_CELL_PX = 160  # small inputs are upscaled (whole factors) until a panel is at least this big
_MAX_CANVAS_PX = 32768
_DPI = 100
_BORDER = np.array([205, 205, 205], dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------


def _to_hw_c(a: np.ndarray, layout: str) -> np.ndarray:
    """An array in ``layout`` -> ``H x W x C`` (drops a batch dimension of 1)."""
    lay = str(layout).upper()
    if lay not in ("NCHW", "NHWC", "CHW", "HWC", "HW"):
        raise ValueError(f"layout must be one of NCHW, NHWC, CHW, HWC, HW; got {layout!r}")
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 4:
        if len(lay) == 3:
            lay = "N" + lay
        if len(lay) != 4:
            raise ValueError(f"a 4-D attribution needs layout NCHW or NHWC, got {layout!r}")
        if a.shape[0] != 1:
            raise ValueError(
                f"expected the attribution of one image, got a batch of {a.shape[0]} "
                f"(shape {a.shape}); pass attribution[i]"
            )
        a, lay = a[0], lay[1:]
    elif a.ndim == 3:
        if len(lay) == 4:
            lay = lay[1:]
        if len(lay) != 3:
            raise ValueError(f"a 3-D attribution needs layout CHW or HWC, got {layout!r}")
    else:
        raise ValueError(f"attribution must be 2-D, 3-D or 4-D, got shape {a.shape}")
    return a if lay == "HWC" else np.moveaxis(a, 0, -1)


def _check_finite(m: np.ndarray) -> None:
    bad = int(np.size(m) - np.count_nonzero(np.isfinite(m)))
    if bad:
        raise ValueError(f"attribution has {bad} NaN/infinite value(s) of {m.size}; cannot draw it")


def _clip(m: np.ndarray, clip: tuple[float, float] | None) -> np.ndarray:
    if clip is None or m.size == 0:
        return m
    q_lo, q_hi = clip
    if not 0.0 <= q_lo <= q_hi <= 100.0:
        raise ValueError(f"clip percentiles must satisfy 0 <= low <= high <= 100, got {clip!r}")
    lo, hi = np.percentile(m, [q_lo, q_hi])
    out = np.clip(m, lo, hi)
    if lo > 0:  # do not lift small positive values (or zeros) to lo: they become 0
        out[m < lo] = 0.0
    if hi < 0:
        out[m > hi] = 0.0
    return out


def attribution_to_map(
    attribution: np.ndarray, layout: str = "NCHW", *, clip: tuple[float, float] | None = DEFAULT_CLIP
) -> np.ndarray:
    """One image's attribution -> 2-D float64 map: channel sum, then percentile clipping.

    ``layout`` is that of the model input: ``"NCHW"``/``"NHWC"`` accept ``[1, ...]`` arrays
    and per-image ``[C, H, W]``/``[H, W, C]`` ones; ``"CHW"``, ``"HWC"`` likewise. A 2-D array
    is taken as an ``H x W`` map whatever the layout. ``clip=None`` skips the clipping.
    """
    a = np.asarray(attribution, dtype=np.float64)
    m = _to_hw_c(a, layout).sum(axis=-1)
    _check_finite(m)
    return _clip(m, clip)


def channel_mean_map(activation_grad: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    """Channel *mean* of a hidden-layer attribution (paper Figure 6), as a 2-D float64 map."""
    a = np.asarray(activation_grad, dtype=np.float64)
    m = _to_hw_c(a, layout).mean(axis=-1)
    _check_finite(m)
    return m


def scale_map(m: np.ndarray, *, symmetric: bool = True) -> np.ndarray:
    """Map values to ``[-1, 1]`` by ``m / max|m|`` (symmetric) or to ``[0, 1]`` by min-max.

    A constant map (all zero, say) gives zeros (symmetric) or 0.5 (not symmetric): no NaN.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.size == 0:
        return m.copy()
    if symmetric:
        v = float(np.max(np.abs(m)))
        return m / v if v > 0 else np.zeros_like(m)
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5)


def _colormap(cmap: Any) -> Any:
    import matplotlib

    cm = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    # an odd number of levels puts an entry exactly at 0.5: zero attribution is exactly the
    # colour map's midpoint (pure white for "bwr"), not the entry next to it
    return cm.resampled(511) if hasattr(cm, "resampled") else cm


def _colour(values01: np.ndarray, cmap: Any) -> np.ndarray:
    rgba = _colormap(cmap)(np.clip(values01, 0.0, 1.0), bytes=True)
    return np.ascontiguousarray(rgba[..., :3])


def _as_map(attribution: np.ndarray, layout: str, clip: tuple[float, float] | None) -> np.ndarray:
    return attribution_to_map(attribution, layout, clip=clip)


def heatmap_rgb(
    attribution: np.ndarray,
    *,
    layout: str = "NCHW",
    cmap: Any = "bwr",
    symmetric: bool = True,
    clip: tuple[float, float] | None = DEFAULT_CLIP,
) -> np.ndarray:
    """Attribution (or a 2-D map) -> uint8 ``H x W x 3`` picture (module docstring, steps 1-3).

    Default: diverging ``"bwr"`` symmetric about 0, so white = 0, red > 0, blue < 0; an all
    non-negative map uses the white-to-red half; an all-zero map is plain white.
    """
    m = _as_map(attribution, layout, clip)
    s = scale_map(m, symmetric=symmetric)
    return _colour((s + 1.0) / 2.0 if symmetric else s, cmap)


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    im = np.asarray(image)
    if im.ndim == 3 and im.shape[2] == 1:
        im = im[:, :, 0]
    if im.ndim == 2:
        im = np.repeat(im[:, :, None], 3, axis=2)
    if im.ndim != 3 or im.shape[2] not in (3, 4):
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {im.shape}")
    im = im[:, :, :3]
    if im.dtype != np.uint8:
        if np.issubdtype(im.dtype, np.floating):
            if not np.all(np.isfinite(im)):
                raise ValueError("image has NaN/infinite values")
            im = np.clip(np.rint(im * 255.0 if im.max() <= 1.0 else im), 0, 255)
        im = np.clip(im, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(im)


def overlay_rgb(
    image_rgb: np.ndarray,
    attribution: np.ndarray,
    alpha: float = 0.6,
    *,
    layout: str = "NCHW",
    cmap: Any = "bwr",
    clip: tuple[float, float] | None = DEFAULT_CLIP,
) -> np.ndarray:
    """The heatmap blended onto a grayscale copy of ``image_rgb``, weighted by ``alpha * |s|``.

    ``s`` is the clipped map scaled to ``[-1, 1]``; where the attribution is 0 the photo shows
    unchanged. ``image_rgb`` must have the attribution's height and width.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    img = _as_rgb_uint8(image_rgb).astype(np.float64)
    m = _as_map(attribution, layout, clip)
    if m.shape != img.shape[:2]:
        raise ValueError(
            f"image is {img.shape[0]}x{img.shape[1]} but the attribution map is {m.shape[0]}x{m.shape[1]}; "
            "pass the display image of the same crop (load_image returns it)"
        )
    s = scale_map(m, symmetric=True)
    colour = _colour((s + 1.0) / 2.0, cmap).astype(np.float64)
    gray = (img @ np.array([0.299, 0.587, 0.114]))[:, :, None]
    w = (alpha * np.abs(s))[:, :, None]
    return np.clip(np.rint((1.0 - w) * gray + w * colour), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def save_png(path: str | os.PathLike, rgb_uint8: np.ndarray) -> Path:
    """Write an ``H x W x 3`` (or ``H x W`` / ``H x W x 4``) uint8 image as PNG, atomically.

    Parent folders are created; the file appears complete or not at all (temp file in the same
    folder, then ``os.replace``).
    """
    from PIL import Image

    a = np.asarray(rgb_uint8)
    if a.dtype != np.uint8:
        raise ValueError(f"save_png wants uint8 pixels, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"save_png wants H x W, H x W x 3 or H x W x 4 pixels, got shape {a.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            Image.fromarray(np.ascontiguousarray(a)).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def _fit(panel: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Upscale by a whole factor (nearest) to fit ``ch x cw``; downscale (Lanczos) if too big."""
    h, w = panel.shape[:2]
    k = min(ch // h, cw // w)
    if k >= 1:
        return np.repeat(np.repeat(panel, k, axis=0), k, axis=1) if k > 1 else panel
    from PIL import Image

    f = min(ch / h, cw / w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(panel).resize(size, Image.Resampling.LANCZOS))


class _Text:
    """Measures and draws text with matplotlib (Agg) in pixel coordinates."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._fig = Figure(figsize=(4, 4), dpi=_DPI)
        self._canvas = FigureCanvasAgg(self._fig)
        self._renderer = self._canvas.get_renderer()

    def size(self, s: str, pt: float, bold: bool = False) -> tuple[float, float]:
        if not s:
            return 0.0, 0.0
        t = self._fig.text(0, 0, s, fontsize=pt, fontweight="bold" if bold else "normal", parse_math=False)
        bb = t.get_window_extent(self._renderer)
        t.remove()
        return bb.width, bb.height

    def _wrap(self, s: str, pt: float, max_w: float, bold: bool, max_lines: int,
              break_words: bool = False) -> str | None:
        """``s`` wrapped into at most ``max_lines`` lines no wider than ``max_w``, or None.

        Wraps at spaces; ``break_words`` also breaks inside words (e.g. long method names)."""
        if "\n" in s or (not break_words and " " not in s.strip()):
            return None
        for chars in range(len(s) - 1, 1, -1):
            lines = textwrap.wrap(s, width=chars, break_long_words=break_words)
            if len(lines) > max_lines:
                return None
            if all(self.size(line, pt, bold)[0] <= max_w for line in lines):
                return "\n".join(lines)
        return None

    def fit_width(self, s: str, pt: float, max_w: float, min_pt: float = 7.0, *, bold: bool = False,
                  wrap_first: bool = False, max_lines: int = 2) -> tuple[str, float]:
        """Make ``s`` at most ``max_w`` pixels wide: wrap at spaces (first, if ``wrap_first``),
        shrink the font down to ``min_pt``, break long words, and as a last resort cut it
        with an ellipsis."""
        if self.size(s, pt, bold)[0] <= max_w:
            return s, pt
        if wrap_first and (w := self._wrap(s, pt, max_w, bold, max_lines)) is not None:
            return w, pt
        while pt > min_pt:
            pt = max(min_pt, pt - 0.5)
            if self.size(s, pt, bold)[0] <= max_w:
                return s, pt
            if (w := self._wrap(s, pt, max_w, bold, max_lines)) is not None:
                return w, pt
        if (w := self._wrap(s, pt, max_w, bold, max_lines, break_words=True)) is not None:
            return w, pt
        lines = s.splitlines() or [s]
        out = []
        for line in lines[:max_lines]:
            if self.size(line, pt, bold)[0] > max_w:
                while len(line) > 1 and self.size(line + "\u2026", pt, bold)[0] > max_w:
                    line = line[:-1]
                line += "\u2026"
            out.append(line)
        if len(lines) > max_lines and not out[-1].endswith("\u2026"):
            out[-1] += "\u2026"
        return "\n".join(out), pt


def _layout_and_render(
    cells: list[list[np.ndarray | None]],
    col_labels: Sequence[str],
    row_labels: Sequence[str | None],
    path: str | os.PathLike,
    title: str | None,
    note: str | None,
    cell_px: int | None,
) -> Path:
    """Paste panels onto one canvas, write the labels with matplotlib, save a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.transforms import IdentityTransform

    panels = [p for row in cells for p in row if p is not None]
    if not panels:
        raise ValueError("nothing to draw: no images and no attribution maps")
    max_h = max(p.shape[0] for p in panels)
    max_w = max(p.shape[1] for p in panels)
    if cell_px is None:
        k = max(1, math.ceil(_MIN_CELL_PX / max(max_h, max_w)))
        ch, cw = k * max_h, k * max_w
    else:
        if cell_px < 8:
            raise ValueError(f"cell_px must be at least 8, got {cell_px}")
        f = cell_px / max(max_h, max_w)
        ch, cw = max(1, round(max_h * f)), max(1, round(max_w * f))

    nrows, ncols = len(cells), len(col_labels)
    text = _Text()
    pt = float(min(13.0, max(9.0, cw / 17.0)))
    margin, gap = 12, 8

    heads = [text.fit_width(s, pt, cw) for s in col_labels]
    head_h = max((text.size(s, p)[1] for s, p in heads if s), default=0.0)
    head_h = math.ceil(head_h) + 6 if head_h else 0

    has_rows = any(r for r in row_labels)
    rows_fit: list[tuple[str, float]] = []
    left_w = 0
    if has_rows:
        max_row_w = max(1.25 * cw, 150)
        for r in row_labels:
            rows_fit.append(text.fit_width(r, pt, max_row_w, wrap_first=True, max_lines=3) if r else ("", pt))
        left_w = math.ceil(max(text.size(s, p)[0] for s, p in rows_fit if s)) + gap + 4

    grid_w = ncols * cw + (ncols - 1) * gap
    width = margin + left_w + grid_w + margin
    title_pt = pt + 2.0
    if title:
        title_s, title_pt = text.fit_width(title, title_pt, width - 2 * margin, min_pt=9, bold=True, wrap_first=True)
        title_h = math.ceil(text.size(title_s, title_pt, bold=True)[1]) + 10
    else:
        title_s, title_h = "", 0
    note_pt = max(8.0, pt - 2.0)
    if note:
        note_s, note_pt = text.fit_width(note, note_pt, width - 2 * margin, min_pt=7, wrap_first=True, max_lines=3)
        note_h = math.ceil(text.size(note_s, note_pt)[1]) + 8
    else:
        note_s, note_h = "", 0

    grid_top = margin + title_h + head_h
    height = grid_top + nrows * ch + (nrows - 1) * gap + note_h + margin
    if width > _MAX_CANVAS_PX or height > _MAX_CANVAS_PX:
        raise ValueError(
            f"the grid would be {width}x{height} pixels (limit {_MAX_CANVAS_PX}); "
            "draw fewer rows per file or pass a smaller cell_px"
        )

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    x0 = margin + left_w
    for i, row in enumerate(cells):
        y = grid_top + i * (ch + gap)
        for j, panel in enumerate(row):
            if panel is None:
                continue
            p = _fit(_as_rgb_uint8(panel), ch, cw)
            ph, pw = p.shape[:2]
            top = y + (ch - ph) // 2
            left = x0 + j * (cw + gap) + (cw - pw) // 2
            canvas[top - 1 : top + ph + 1, left - 1 : left + pw + 1] = _BORDER  # 1-px frame
            canvas[top : top + ph, left : left + pw] = p

    fig = Figure(figsize=((width + 0.5) / _DPI, (height + 0.5) / _DPI), dpi=_DPI, facecolor="white")
    agg = FigureCanvasAgg(fig)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    ident = IdentityTransform()

    def put(x: float, y_from_top: float, s: str, size: float, **kw: Any) -> None:
        fig.text(x, height - y_from_top, s, fontsize=size, transform=ident, parse_math=False,
                 color=kw.pop("color", "#202020"), **kw)

    if title_s:
        # centred over the panels when it fits there, else over the whole picture
        tw = text.size(title_s, title_pt, bold=True)[0]
        cx = x0 + grid_w / 2 if tw <= grid_w else width / 2
        put(cx, margin, title_s, title_pt, ha="center", va="top", fontweight="bold", multialignment="center")
    for j, (s, p) in enumerate(heads):
        if s:
            put(x0 + j * (cw + gap) + cw / 2, grid_top - 4, s, p, ha="center", va="bottom", linespacing=1.1)
    for i, (s, p) in enumerate(rows_fit):
        if s:
            put(x0 - gap - 2, grid_top + i * (ch + gap) + ch / 2, s, p, ha="right", va="center",
                multialignment="right", linespacing=1.15)
    if note_s:
        put(margin, height - margin - note_h + 8, note_s, note_pt, ha="left", va="top", color="#707070")

    agg.draw()
    rgba = np.asarray(agg.buffer_rgba())
    if rgba.shape[:2] != (height, width):  # never expected; keeps the pixel layout honest
        raise RuntimeError(f"internal: rendered {rgba.shape[:2]}, laid out {(height, width)}")
    return save_png(path, np.ascontiguousarray(rgba[:, :, :3]))


def _default_note(overlay: bool, clip: tuple[float, float] | None) -> str:
    c = f", clipped to its {clip[0]:g}-{clip[1]:g}th percentiles" if clip else ""
    how = "heat over a grayscale input" if overlay else "white = 0"
    return (f"Red = positive, blue = negative, {how}. Each map: sum over colour channels{c}, "
            "scaled to its own max |value|.")


def method_grid_many(
    rows: Sequence[tuple[np.ndarray | None, Mapping[str, np.ndarray], str | None]],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    overlay: bool = False,
    layout: str = "NCHW",
    cmap: Any = "bwr",
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    alpha: float = 0.6,
    cell_px: int | None = None,
    note: str | bool = True,
) -> Path:
    """Several images: one row per ``(image_rgb, {method: attribution}, row_label)``.

    Columns: the input image (left out when every image is ``None``), then one per method in
    first-seen order, method names on top; a method missing from a row leaves a blank cell.
    Row labels (e.g. ``"cat (pred 281, 0.93)"``) go on the left; ``None`` for none.
    ``overlay=True`` draws :func:`overlay_rgb` panels instead of plain heatmaps. ``note``:
    ``True`` writes a one-line colour key at the bottom, a string writes that, ``False`` none.
    ``cell_px``: panel size in pixels (default: inputs upscaled by a whole factor to >= 160 px).
    Returns the PNG's path.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("method_grid_many needs at least one row")
    methods: list[str] = []
    for _, attrs, _ in rows:
        for name in attrs:
            if name not in methods:
                methods.append(name)
    show_input = any(img is not None for img, _, _ in rows)
    cells: list[list[np.ndarray | None]] = []
    for img, attrs, _ in rows:
        row: list[np.ndarray | None] = [(_as_rgb_uint8(img) if img is not None else None)] if show_input else []
        for name in methods:
            if name not in attrs:
                row.append(None)
            elif overlay:
                if img is None:
                    raise ValueError(f"overlay=True needs an image for every row (method {name!r})")
                row.append(overlay_rgb(img, attrs[name], alpha, layout=layout, cmap=cmap, clip=clip))
            else:
                row.append(heatmap_rgb(attrs[name], layout=layout, cmap=cmap, clip=clip))
        cells.append(row)
    col_labels = (["input"] if show_input else []) + [str(m) for m in methods]
    note_s = _default_note(overlay, clip) if note is True else (note or None)
    return _layout_and_render(cells, col_labels, [r[2] for r in rows], path, title, note_s, cell_px)


def method_grid(
    image_rgb: np.ndarray | None,
    attributions: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    overlay: bool = False,
    layout: str = "NCHW",
    cmap: Any = "bwr",
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    alpha: float = 0.6,
    cell_px: int | None = None,
    note: str | bool = True,
) -> Path:
    """One row like the paper's Figure 1: the input, then one heatmap per method, names on top."""
    return method_grid_many([(image_rgb, attributions, None)], path, title, overlay=overlay, layout=layout,
                            cmap=cmap, clip=clip, alpha=alpha, cell_px=cell_px, note=note)


def layer_maps_grid(
    maps: Mapping[str, np.ndarray] | Mapping[str, Mapping[str, np.ndarray]],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    layout: str = "NCHW",
    cmap: Any = "bwr",
    clip: tuple[float, float] | None = DEFAULT_CLIP,
    cell_px: int | None = None,
    note: str | bool = True,
) -> Path:
    """Hidden-layer attribution maps side by side (paper Figure 6), one column per layer.

    ``maps`` is ``{layer_name: map}`` for one row, or ``{row_label: {layer_name: map}}`` for
    several (e.g. saliency vs RectGrad). Put layers in input-to-output order: they are drawn
    left to right. A 2-D map is drawn as given; a 3-D/4-D one (``layout``) is averaged over
    channels first (:func:`channel_mean_map`). Maps of different sizes are each upscaled by a
    whole factor to the common panel size.
    """
    if not maps:
        raise ValueError("layer_maps_grid needs at least one map")
    first = next(iter(maps.values()))
    multi = isinstance(first, Mapping)
    row_dicts: list[tuple[str | None, Mapping[str, np.ndarray]]] = (
        [(str(k), v) for k, v in maps.items()] if multi else [(None, maps)]  # type: ignore[list-item]
    )
    layers: list[str] = []
    for _, d in row_dicts:
        for name in d:
            if name not in layers:
                layers.append(name)
    cells = []
    for _, d in row_dicts:
        row: list[np.ndarray | None] = []
        for name in layers:
            if name not in d:
                row.append(None)
                continue
            a = np.asarray(d[name])
            m = a.astype(np.float64) if a.ndim == 2 else channel_mean_map(a, layout)
            row.append(heatmap_rgb(m, cmap=cmap, clip=clip))
        cells.append(row)
    if note is True:
        c = f", clipped to its {clip[0]:g}-{clip[1]:g}th percentiles" if clip else ""
        note = (f"Red = positive, blue = negative, white = 0. Each map: channel mean at that layer{c}, "
                "scaled to its own max |value|.")
    return _layout_and_render(cells, layers, [r for r, _ in row_dicts], path, title, note or None, cell_px)
