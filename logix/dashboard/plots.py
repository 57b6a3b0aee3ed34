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
_W, _H, _PAD_L, _PAD_R, _PAD_T, _PAD_B = 460, 220, 56, 22, 14, 34

Series = Tuple[str, Sequence[float], Sequence[float]]  # (label, xs, ys)


def line_plot(series: List[Series], title: str = "", xlabel: str = "", ylabel: str = "",
              log_y: bool = False, markers: bool = False, dashed: Sequence[str] = (),
              x_integer: bool = False) -> Markup:
    """Lines (or dots) of several series on shared axes; log_y drops values <= 0;
    x_integer: the x axis counts things (an index, a shard, k), so its ticks are whole."""
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
    x_ticks = nice_ticks(*_span([p[0] for p in every]), integer=x_integer)
    y_ticks = log_ticks(*_span([ty(p[1]) for p in every])) if log_y else \
        nice_ticks(*_span([p[1] for p in every]))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    sx = lambda x: _PAD_L + (x - x0) / (x1 - x0) * (_W - _PAD_L - _PAD_R)  # noqa: E731
    sy = lambda y: _H - _PAD_B - (ty(y) - y0) / (y1 - y0) * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes(x_ticks, y_ticks, log_y, xlabel, ylabel)]
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
    y_ticks = nice_ticks(*_span([0.0] + [v for _, v in pairs]))
    y0, y1 = y_ticks[0], y_ticks[-1]
    width = (_W - _PAD_L - _PAD_R) / len(pairs)
    sy = lambda y: _H - _PAD_B - (y - y0) / (y1 - y0) * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes([], y_ticks, False, "", ylabel)]
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
    x_ticks = nice_ticks(*_span(array.tolist()))
    lo, hi = x_ticks[0], x_ticks[-1]
    counts, edges = np.histogram(array, bins=bins, range=(lo, hi))
    y_ticks = nice_ticks(0, max(int(counts.max()), 1), integer=True)
    c1 = y_ticks[-1]
    sx = lambda x: _PAD_L + (x - lo) / (hi - lo) * (_W - _PAD_L - _PAD_R)  # noqa: E731
    sy = lambda y: _H - _PAD_B - y / c1 * (_H - _PAD_T - _PAD_B)  # noqa: E731
    parts = [_axes(x_ticks, y_ticks, False, xlabel, "count")]
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


def heat_legend(scale: float, width: int = 260) -> Markup:
    """The colour scale of a heat map: -scale (red, harmful) to +scale (blue, helpful)."""
    steps = 40
    cells = join(render('<rect x="$x" y="0" width="$w" height="12" fill="$c"/>',
                        x=f"{n * width / steps:.1f}", w=f"{width / steps + 0.5:.1f}",
                        c=heat_color((2 * n / (steps - 1) - 1) * scale, scale))
                 for n in range(steps))
    labels = join(render('<text x="$x" y="26" text-anchor="$a" class="tick">$v</text>',
                         x=x, a=a, v=v) for x, a, v in (
        (0, "start", f"{-scale:.3g} harmful"), (width / 2, "middle", "0"),
        (width, "end", f"helpful {scale:.3g}")))
    return render('<svg class="heat-legend" viewBox="0 0 $w 30" width="$w" height="30" '
                  'xmlns="http://www.w3.org/2000/svg" role="img">$cells'
                  '<rect x="0" y="0" width="$w" height="12" fill="none" stroke="#bbb"/>$labels'
                  '</svg>', w=width, cells=cells, labels=labels)


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> List[float]:
    """Round ticks covering [lo, hi]: steps of 1, 2 or 5 x 10^k (whole steps when `integer`),
    from the step below lo to the step above hi."""
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    if integer:
        step = max(step, 1.0)
    start, stop = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    if stop == start:
        stop += 1
    return [round(n * step, 12) for n in range(start, stop + 1)]


def log_ticks(lo: float, hi: float) -> List[float]:
    """Ticks of a log10 axis (values are exponents): whole decades, every second or more when
    there are many; the axis spans from the decade below lo to the one above hi."""
    start, stop = math.floor(lo + 1e-9), math.ceil(hi - 1e-9)
    if stop == start:
        stop += 1
    every = max(1, math.ceil((stop - start) / 6))
    stop = start + every * math.ceil((stop - start) / every)
    return [float(n) for n in range(start, stop + 1, every)]


# --------------------------------------------------------------------------- helpers
def _span(values: Sequence[float]) -> Tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.5 or 1.0
        return lo - pad, hi + pad
    return lo, hi


def _fmt(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def _axes(x_ticks: Sequence[float], y_ticks: Sequence[float], log_y: bool, xlabel: str,
          ylabel: str) -> Markup:
    """Frame, grid lines and tick labels at the given ticks (the first and last are the axis
    ends; y ticks of a log axis are exponents)."""
    left, right, top, bottom = _PAD_L, _W - _PAD_R, _PAD_T, _H - _PAD_B
    parts = [render('<rect x="$x" y="$y" width="$w" height="$h" fill="none" stroke="#bbb"/>',
                    x=left, y=top, w=right - left, h=bottom - top)]
    for value in y_ticks:
        y = bottom - (value - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top)
        parts.append(render('<line x1="$l" x2="$r" y1="$y" y2="$y" stroke="#eee"/><text x="$x" '
                            'y="$ty" text-anchor="end" class="tick">$v</text>', l=left, r=right,
                            y=f"{y:.1f}", x=left - 4, ty=f"{y + 3:.1f}",
                            v=_fmt(10 ** value) if log_y else _fmt(value)))
    for value in x_ticks:
        x = left + (value - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left)
        parts.append(render('<text x="$x" y="$y" text-anchor="middle" class="tick">$v</text>',
                            x=f"{x:.1f}", y=bottom + 13, v=_fmt(value)))
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
