"""Plots as inline SVG (built with markup.render: every label escaped) and images as PNG data
URIs: no plotting library, no network, the same markup in the live dashboard and the report."""

from __future__ import annotations

import base64
import math
import struct
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np

from logix.dashboard.markup import Markup, join, render

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 460, 220, 56, 12, 14, 34

Series = Tuple[str, Sequence[float], Sequence[float]]  # (label, xs, ys)


def line_plot(series: List[Series], title: str = "", xlabel: str = "", ylabel: str = "",
              log_y: bool = False, markers: bool = False, dashed: Sequence[str] = ()) -> Markup:
    """Lines (or dots) of several series on shared axes; log_y drops values <= 0."""
    points = []
    for label, xs, ys in series:
        pts = [(float(x), float(y)) for x, y in zip(xs, ys)
               if y is not None and math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        points.append((label, pts))
    every = [p for _, pts in points for p in pts]
    if not every:
        return _empty(title, "nothing to plot")
    tx = lambda v: v  # noqa: E731
    ty = (lambda v: math.log10(v)) if log_y else tx  # noqa: E731
    x0, x1 = _span([p[0] for p in every])
    y0, y1 = _span([ty(p[1]) for p in every])
    sx = lambda x: _PAD_L + (x - x0) / (x1 - x0) * (_W - _PAD_L - _PAD_R)  # noqa: E731
    sy = lambda y: _H - _PAD_B - (ty(y) - y0) / (y1 - y0) * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes(x0, x1, y0, y1, log_y, xlabel, ylabel)]
    for n, (label, pts) in enumerate(points):
        color = COLORS[n % len(COLORS)]
        if markers or len(pts) == 1:
            parts += [render('<circle cx="$x" cy="$y" r="2.5" fill="$c"/>', x=f"{sx(x):.1f}",
                             y=f"{sy(y):.1f}", c=color) for x, y in pts]
        if not markers and len(pts) > 1:
            dash = render(' stroke-dasharray="5,3"') if label in dashed else ""
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(render('<polyline points="$p" fill="none" stroke="$c" '
                                'stroke-width="1.6"$dash/>', p=path, c=color, dash=dash))
    if len(points) > 1:
        parts.append(_legend([label for label, _ in points]))
    return _svg(title, parts)


def bar_plot(labels: Sequence[str], values: Sequence[Optional[float]], title: str = "",
             ylabel: str = "") -> Markup:
    """Vertical bars from 0 (negative values go down); None values are left out."""
    pairs = [(str(l), float(v)) for l, v in zip(labels, values)
             if v is not None and math.isfinite(float(v))]
    if not pairs:
        return _empty(title, "nothing to plot")
    y0, y1 = _span([0.0] + [v for _, v in pairs])
    width = (_W - _PAD_L - _PAD_R) / len(pairs)
    sy = lambda y: _H - _PAD_B - (y - y0) / (y1 - y0) * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes(0, len(pairs), y0, y1, False, "", ylabel, x_ticks=False)]
    for n, (label, value) in enumerate(pairs):
        top, bottom = sorted((sy(value), sy(0.0)))
        x = _PAD_L + n * width
        color = COLORS[0] if value >= 0 else COLORS[1]
        parts.append(render('<rect x="$x" y="$y" width="$w" height="$h" fill="$c">'
                            '<title>$label: $v</title></rect>', x=f"{x + width * 0.1:.1f}",
                            y=f"{top:.1f}", w=f"{width * 0.8:.1f}",
                            h=f"{max(bottom - top, 0.5):.1f}", c=color, label=label,
                            v=f"{value:.4g}"))
        if len(pairs) <= 16:
            parts.append(render('<text x="$x" y="$y" text-anchor="middle" class="tick">$l</text>',
                                x=f"{x + width / 2:.1f}", y=_H - _PAD_B + 13, l=label[:10]))
    return _svg(title, parts)


def histogram(values: Sequence[float], bins: int = 30, title: str = "", xlabel: str = "",
              mark: Optional[float] = None) -> Markup:
    """Counts of `values` in equal bins; `mark` draws a vertical line (e.g. a mean)."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size == 0:
        return _empty(title, "nothing to plot")
    lo, hi = _span(array.tolist())
    counts, edges = np.histogram(array, bins=bins, range=(lo, hi))
    c1 = max(int(counts.max()), 1)
    sx = lambda x: _PAD_L + (x - lo) / (hi - lo) * (_W - _PAD_L - _PAD_R)  # noqa: E731
    sy = lambda y: _H - _PAD_B - y / c1 * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes(lo, hi, 0, c1, False, xlabel, "count")]
    for count, a, b in zip(counts, edges[:-1], edges[1:]):
        if count:
            parts.append(render('<rect x="$x" y="$y" width="$w" height="$h" fill="$c"/>',
                                x=f"{sx(a):.1f}", y=f"{sy(count):.1f}",
                                w=f"{max(sx(b) - sx(a) - 0.5, 0.5):.1f}",
                                h=f"{sy(0) - sy(count):.1f}", c=COLORS[0]))
    if mark is not None and lo <= mark <= hi:
        parts.append(render('<line x1="$x" x2="$x" y1="$y1" y2="$y2" stroke="$c" '
                            'stroke-width="1.5"/>', x=f"{sx(mark):.1f}", y1=_PAD_T,
                            y2=_H - _PAD_B, c=COLORS[1]))
    return _svg(title, parts)


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA) array as a data: URI."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    height, width = image.shape[:2]
    color = 0 if image.ndim == 2 else {3: 2, 4: 6}[image.shape[2]]  # PNG colour type
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def heat_color(value: float, scale: float) -> str:
    """Blue for positive (helpful), red for negative (harmful), white at 0; |value| / scale."""
    t = 0.0 if scale <= 0 or not math.isfinite(value) else max(-1.0, min(1.0, value / scale))
    r, g, b = (255 - int(200 * t), 255 - int(130 * t), 255) if t >= 0 else \
        (255, 255 + int(200 * t), 255 + int(200 * t))
    return f"rgb({r},{g},{b})"


# --------------------------------------------------------------------------- helpers
def _span(values: Sequence[float]) -> Tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.5 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _axes(x0, x1, y0, y1, log_y, xlabel, ylabel, x_ticks: bool = True) -> Markup:
    left, right, top, bottom = _PAD_L, _W - _PAD_R, _PAD_T, _H - _PAD_B
    parts = [render('<rect x="$x" y="$y" width="$w" height="$h" fill="none" stroke="#bbb"/>',
                    x=left, y=top, w=right - left, h=bottom - top)]
    for n in range(5):
        t = n / 4
        y = bottom - t * (bottom - top)
        value = y0 + t * (y1 - y0)
        parts.append(render('<line x1="$l" x2="$r" y1="$y" y2="$y" stroke="#eee"/><text x="$x" '
                            'y="$ty" text-anchor="end" class="tick">$v</text>', l=left, r=right,
                            y=f"{y:.1f}", x=left - 4, ty=f"{y + 3:.1f}",
                            v=_fmt(10 ** value) if log_y else _fmt(value)))
        if x_ticks:
            parts.append(render('<text x="$x" y="$y" text-anchor="middle" class="tick">$v</text>',
                                x=f"{left + t * (right - left):.1f}", y=bottom + 13,
                                v=_fmt(x0 + t * (x1 - x0))))
    if xlabel:
        parts.append(render('<text x="$x" y="$y" text-anchor="middle" class="label">$l</text>',
                            x=(left + right) / 2, y=_H - 4, l=xlabel))
    if ylabel:
        parts.append(render('<text x="12" y="$y" text-anchor="middle" class="label" '
                            'transform="rotate(-90 12 $y)">$l</text>', y=(top + bottom) / 2,
                            l=ylabel))
    return join(parts)


def _legend(labels: Sequence[str]) -> Markup:
    return join(render('<rect x="$x" y="$y0" width="10" height="10" fill="$c"/><text x="$tx" '
                       'y="$y1" class="tick">$l</text>', x=_W - _PAD_R - 120,
                       y0=_PAD_T + 4 + 13 * n, c=COLORS[n % len(COLORS)], tx=_W - _PAD_R - 106,
                       y1=_PAD_T + 13 + 13 * n, l=str(label)[:18])
                for n, label in enumerate(labels[:8]))


def _svg(title: str, parts: List[Markup]) -> Markup:
    head = render('<div class="plot-title">$t</div>', t=title) if title else ""
    return render('<figure class="plot">$head<svg viewBox="0 0 $w $h" width="$w" height="$h" '
                  'xmlns="http://www.w3.org/2000/svg" role="img">$parts</svg></figure>',
                  head=head, w=_W, h=_H, parts=join(parts))


def _empty(title: str, message: str) -> Markup:
    return _svg(title, [render('<text x="$x" y="$y" text-anchor="middle" class="label">$m</text>',
                               x=_W / 2, y=_H / 2, m=message)])
