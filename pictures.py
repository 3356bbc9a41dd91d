"""The pictures a run writes, with the standard library only: sample grids as PNG (zlib +
struct) and the learning curve as SVG (text).
"""

import base64
import json
import math
import struct
import zlib
from xml.sax.saxutils import escape

import numpy as np

GRID_WIDTH = 512  # sample grids are upscaled (nearest neighbour) to at least this many pixels


# ------------------------------------------------------------------------------------------
# Sample grids


def write_png(path: str, rows: list[np.ndarray], scale: int = 1) -> None:
    """Rows of uint8 images [n_i, H, W, C] (C = 1 or 3) -> one PNG grid on white, each image
    upscaled `scale` times (nearest neighbour), a gap of max(1, scale // 2) pixels around it."""
    with open(path, "wb") as f:
        f.write(png_bytes(rows, scale))


def png_bytes(rows: list[np.ndarray], scale: int = 1) -> bytes:
    """write_png's file, as bytes."""
    H, W, C = rows[0].shape[1:]
    gap, h, w = max(1, scale // 2), H * scale, W * scale
    cols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, C), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = gap + r * (h + gap), gap + c * (w + gap)
            grid[top:top + h, left:left + w] = image.repeat(scale, 0).repeat(scale, 1)
    raw = b"".join(b"\x00" + line.tobytes() for line in grid)  # filter type 0 on every row

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", grid.shape[1], grid.shape[0], 8, {1: 0, 3: 2}[C], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def grid_scale(cols: int, width: int) -> int:
    """The integer upscaling that makes `cols` images of `width` pixels about GRID_WIDTH wide."""
    return max(1, math.ceil(GRID_WIDTH / (cols * (width + 1))))


def write_grid(path: str, rows: list[np.ndarray]) -> None:
    """A PNG of rows of samples, upscaled to about GRID_WIDTH pixels across."""
    write_png(path, rows, grid_scale(max(map(len, rows)), rows[0].shape[2]))


# ------------------------------------------------------------------------------------------
# The learning curve

SIZE, MARGIN = (720, 420), (70, 30, 40, 60)  # pixels: width, height; left, right, top, bottom
COLORS = {"train": "#1f77b4", "held": "#d62728", "baseline": "#7f7f7f"}


def ticks(lo: float, hi: float, count: int = 6) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) in [lo, hi]."""
    raw = (hi - lo) / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def curve_svg(train: list, held: list, held_name: str, baseline: float | None,
              title: str) -> str:
    """An SVG plot of bits/dim against steps: `train` [(step, bpd)] as a line, `held`
    [(step, bpd, minutes)] as a line with dots labelled by wall time, the baseline as a dashed
    line. Points are written in data units (step, bpd) inside one transformed group, so a
    reader of the file gets the numbers back exactly."""
    (width, height), (left, right, top, bottom) = SIZE, MARGIN
    points = [p[:2] for p in train + held] + ([(0, baseline)] if baseline else [])
    x_hi = max(s for s, _ in points) or 1
    ys = [b for _, b in points]
    y_lo, y_hi = min(ys), max(ys)
    y_lo, y_hi = y_lo - 0.05 * (y_hi - y_lo or 1), y_hi + 0.05 * (y_hi - y_lo or 1)
    sx, sy = (width - left - right) / x_hi, (height - top - bottom) / (y_hi - y_lo)
    px = lambda s: left + s * sx  # noqa: E731
    py = lambda b: height - bottom - (b - y_lo) * sy  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle">{escape(title)}</text>']
    for s in ticks(0, x_hi):
        out.append(f'<text x="{px(s):.1f}" y="{height - bottom + 18}" text-anchor="middle">'
                   f'{s:g}</text>')
    for b in ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(b):.1f}" y2="{py(b):.1f}" '
                   f'stroke="#e0e0e0"/><text x="{left - 6}" y="{py(b) + 4:.1f}" '
                   f'text-anchor="end">{b:g}</text>')
    out.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">training step'
               '</text><text x="16" y="{0}" transform="rotate(-90 16 {0})" '
               'text-anchor="middle">bits/dim</text>'.format(height / 2))
    out.append(f'<g class="data" transform="translate({px(0)} {py(0)}) scale({sx} {-sy})">')
    style = 'fill="none" vector-effect="non-scaling-stroke"'
    if baseline:
        out.append(f'<line class="baseline" x1="0" x2="{x_hi}" y1="{baseline}" y2="{baseline}" '
                   f'stroke="{COLORS["baseline"]}" stroke-dasharray="6 4" {style}/>')
    for name, series in (("train", train), ("held", held)):
        if series:
            out.append(f'<polyline class="{name}" points="'
                       + " ".join(f"{s},{b}" for s, b, *_ in series)
                       + f'" stroke="{COLORS[name]}" stroke-width="2" {style}/>')
    out.append("</g>")
    for s, b, minutes in held:
        out.append(f'<circle cx="{px(s):.1f}" cy="{py(b):.1f}" r="3.5" fill="{COLORS["held"]}"/>'
                   f'<text x="{px(s):.1f}" y="{py(b) - 8:.1f}" text-anchor="middle" '
                   f'font-size="10">{b:.3f} ({minutes:.0f} min)</text>')
    legend = [("train", "training batches"), ("held", f"{held_name} (wall time)")]
    if baseline:
        legend.append(("baseline", f"per-pixel histogram: {baseline:.3f}"))
    for i, (name, text) in enumerate(legend):
        y = top + 10 + 16 * i
        out.append(f'<line x1="{width - right - 230}" x2="{width - right - 205}" y1="{y}" '
                   f'y2="{y}" stroke="{COLORS[name]}" stroke-width="2"/><text '
                   f'x="{width - right - 200}" y="{y + 4}">{escape(text)}</text>')
    return "\n".join(out + ["</svg>\n"])


def write_curve(metrics_path: str, path: str, title: str) -> None:
    """curve.svg from metrics.jsonl: the log lines' train_bpd; the evaluations' held-out
    bits/dim (validation, else test) with their wall time; the histogram baseline on the same
    set (the record of step 0)."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    held_name = "validation" if any("validation_bpd" in r for r in records) else "test"
    train = [(r["step"], r["train_bpd"]) for r in records if "train_bpd" in r]
    held = [(r["step"], r[f"{held_name}_bpd"], r.get("time_s", 0) / 60) for r in records
            if f"{held_name}_bpd" in r]
    baseline = next((r[f"baseline_{held_name}_bpd"] for r in records
                     if f"baseline_{held_name}_bpd" in r), None)
    with open(path, "w") as f:
        f.write(curve_svg(train, held, held_name, baseline, title))


# ------------------------------------------------------------------------------------------
# A study across compute: bits/dim against a log-scale cost, one line per variant

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round values (1, 2 or 5 times a power of ten; with 3 and 4 as well on a narrow range)
    in [lo, hi] for a log axis."""
    inside = []
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 7)):
        values = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1,
                                             math.ceil(math.log10(hi)) + 1) for m in mantissas]
        inside = [v for v in values if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9)]
        if len(inside) >= 3:
            break
    return inside or [lo, hi]


def study_svg(series: list, title: str, x_label: str, frontier: bool = False,
              log_x: bool = True, y_label: str = "test bits/dim") -> str:
    """An SVG of bits/dim against a cost on a log axis (or, log_x False, a linear one such as
    epochs): `series` [(name, [(x, [bpd per seed][, label])])] as one line per name through the
    means, every seed a dot, a point's label (if any) beside it. frontier: the line is the
    lower envelope instead (the best mean at that cost or less). Each dot carries its numbers
    in data-x and data-bpd, so a reader of the file gets them back exactly."""
    (width, height), (left, right, top, bottom) = SIZE, (70, 30, 40, 60)
    legend_h = 16 * len(series) + 8
    height += legend_h
    xs = [x for _, points in series for x, *_ in points]
    ys = [b for _, points in series for _, bpd, *_ in points for b in bpd]
    if not xs:
        xs, ys = [1.0], [0.0]
    x_lo, x_hi = (min(xs) / 1.25, max(xs) * 1.25) if log_x else (
        min(xs) - 0.04 * (max(xs) - min(xs) or 1), max(xs) + 0.04 * (max(xs) - min(xs) or 1))
    y_lo, y_hi = min(ys), max(ys)
    y_lo, y_hi = y_lo - 0.08 * (y_hi - y_lo or 1), y_hi + 0.08 * (y_hi - y_lo or 1)
    plot_h = height - top - bottom - legend_h
    scale = math.log if log_x else float
    px = lambda x: left + (scale(x) - scale(x_lo)) / (scale(x_hi) - scale(x_lo)) * (  # noqa: E731
        width - left - right)
    py = lambda b: top + plot_h - (b - y_lo) / (y_hi - y_lo) * plot_h  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle">{escape(title)}</text>']
    for x in (log_ticks if log_x else ticks)(x_lo, x_hi):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + plot_h}" '
                   f'stroke="#f0f0f0"/><text x="{px(x):.1f}" y="{top + plot_h + 18}" '
                   f'text-anchor="middle">{x:g}</text>')
    for b in ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{py(b):.1f}" y2="{py(b):.1f}" '
                   f'stroke="#e0e0e0"/><text x="{left - 6}" y="{py(b) + 4:.1f}" '
                   f'text-anchor="end">{b:g}</text>')
    out.append(f'<text x="{width / 2}" y="{top + plot_h + 40}" text-anchor="middle">'
               f'{escape(x_label)}</text><text x="16" y="{top + plot_h / 2}" '
               f'transform="rotate(-90 16 {top + plot_h / 2})" text-anchor="middle">'
               f'{escape(y_label)}</text>')
    for i, (name, points) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        means = sorted((x, float(np.mean(bpd))) for x, bpd, *_ in points)
        if frontier:  # keep each point that beats every cheaper one
            means = [(x, m) for j, (x, m) in enumerate(means)
                     if all(m < other for _, other in means[:j])]
        line = " ".join(f"{px(x):.1f},{py(m):.1f}" for x, m in means)
        out.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, bpd, *label in points:
            for b in bpd:
                out.append(f'<circle cx="{px(x):.1f}" cy="{py(b):.1f}" r="3" fill="{color}" '
                           f'data-x="{x:g}" data-bpd="{b:.4f}"/>')
            if label:
                out.append(f'<text x="{px(x) + 6:.1f}" y="{py(float(np.mean(bpd))) + 4:.1f}" '
                           f'font-size="10">{escape(label[0])}</text>')
        y = top + plot_h + 56 + 16 * i
        out.append(f'<line x1="{left}" x2="{left + 25}" y1="{y}" y2="{y}" stroke="{color}" '
                   f'stroke-width="2"/><text x="{left + 30}" y="{y + 4}">{escape(name)}</text>')
    return "\n".join(out + ["</svg>\n"])


def write_study(path: str, series: list, title: str, x_label: str, **options) -> None:
    """study_svg to `path`; nothing when no series has a point (an empty plot committed beside
    the real pictures would read as a result)."""
    if not any(points for _, points in series):
        return
    with open(path, "w") as f:
        f.write(study_svg(series, title, x_label, **options))


# ------------------------------------------------------------------------------------------
# Inside a flow (inside.py): heat maps, histograms against N(0, 1), a bar per coupling


def heat_map(values: np.ndarray, hi: float) -> np.ndarray:
    """[..., H, W] values in [0, hi] -> uint8 RGB [..., H, W, 3], black through red and yellow
    to white (a monotone scale, readable in grey too)."""
    t = np.clip(values / hi, 0.0, 1.0)[..., None]
    rgb = np.clip(np.concatenate([3 * t, 3 * t - 1, 3 * t - 2], axis=-1), 0.0, 1.0)
    return np.round(255 * rgb).astype(np.uint8)


def svg_open(width: int, height: int, title: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">'
            f'{escape(title)}</text>']


def histograms_svg(panels: list[tuple[str, np.ndarray]], title: str, lim: float = 4.0) -> str:
    """One small panel per (label, values): the values' histogram as a density on [-lim, lim]
    (bars) against the standard normal's density (a red line)."""
    w, h, pad, bins = 170, 150, 20, 40
    out = svg_open(len(panels) * w + pad, h + 60, title)
    edges = np.linspace(-lim, lim, bins + 1)
    grid = np.linspace(-lim, lim, 81)
    normal = np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi)
    for i, (label, values) in enumerate(panels):
        density, _ = np.histogram(values, edges, density=True)
        density *= np.mean(np.abs(values) <= lim)  # a density of all the values, not the shown
        top = max(density.max(), normal.max()) * 1.1
        x0, y0 = pad + i * w, 30 + h  # the panel's origin, bottom left
        px = lambda v: x0 + (v + lim) / (2 * lim) * (w - pad)  # noqa: E731
        py = lambda d: y0 - d / top * h  # noqa: E731
        for lo, hi, d in zip(edges[:-1], edges[1:], density):
            out.append(f'<rect x="{px(lo):.1f}" y="{py(d):.1f}" width="{px(hi) - px(lo):.1f}" '
                       f'height="{y0 - py(d):.1f}" fill="#9ecae1"/>')
        out.append('<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="'
                   + " ".join(f"{px(g):.1f},{py(n):.1f}" for g, n in zip(grid, normal)) + '"/>')
        out.append(f'<line x1="{x0}" x2="{x0 + w - pad}" y1="{y0}" y2="{y0}" stroke="#333"/>')
        for v in (-lim, 0, lim):
            out.append(f'<text x="{px(v):.1f}" y="{y0 + 13}" text-anchor="middle">{v:g}</text>')
        out.append(f'<text x="{x0 + (w - pad) / 2}" y="{y0 + 28}" text-anchor="middle">'
                   f'{escape(label)}</text>')
    return "\n".join(out + ["</svg>\n"])


def bars_svg(values: list[float], colors: list[str], legend: list[tuple[str, str]],
             title: str, y_label: str) -> str:
    """One bar per value, in order (coupling 1 first), coloured by `colors`; `legend` [(color,
    text)] under the plot. Each bar carries its number in data-value."""
    width, height, left, top, plot_h = 720, 300, 60, 30, 200
    out = svg_open(width, height + 16 * len(legend), title)
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    span = (hi - lo) or 1.0
    py = lambda v: top + (hi - v) / span * plot_h  # noqa: E731
    step = (width - left - 20) / len(values)
    for b in ticks(lo, hi):
        out.append(f'<line x1="{left}" x2="{width - 20}" y1="{py(b):.1f}" y2="{py(b):.1f}" '
                   f'stroke="#e0e0e0"/><text x="{left - 6}" y="{py(b) + 4:.1f}" '
                   f'text-anchor="end">{b:g}</text>')
    for i, (v, color) in enumerate(zip(values, colors)):
        y = min(py(v), py(0))
        out.append(f'<rect x="{left + i * step + 1:.1f}" y="{y:.1f}" width="{step - 2:.1f}" '
                   f'height="{abs(py(v) - py(0)):.1f}" fill="{color}" data-value="{v:.6g}"/>')
        if len(values) <= 64 and (i % max(1, len(values) // 16) == 0 or i == len(values) - 1):
            out.append(f'<text x="{left + (i + 0.5) * step:.1f}" y="{top + plot_h + 14}" '
                       f'text-anchor="middle">{i + 1}</text>')
    out.append(f'<line x1="{left}" x2="{width - 20}" y1="{py(0):.1f}" y2="{py(0):.1f}" '
               f'stroke="#333"/><text x="14" y="{top + plot_h / 2}" transform="rotate(-90 14 '
               f'{top + plot_h / 2})" text-anchor="middle">{escape(y_label)}</text>')
    for j, (color, text) in enumerate(legend):
        y = top + plot_h + 36 + 16 * j
        out.append(f'<rect x="{left}" y="{y - 9}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{left + 18}" y="{y + 1}">{escape(text)}</text>')
    return "\n".join(out + ["</svg>\n"])


def labelled_grid_svg(rows: list[np.ndarray], title: str, row_labels: list[str],
                      col_labels: list[str], colour_bar: tuple | None = None) -> str:
    """A grid of images (write_grid's PNG, embedded) with a label left of each row, one above
    each column and, with colour_bar = (lo, hi, label, colours), a scale right of it: colours
    maps values in [lo, hi] [n] to uint8 RGB [n, 3] (heat_map; a grey ramp for values)."""
    H, W = rows[0].shape[1:3]
    cols = max(map(len, rows))
    scale = grid_scale(cols, W)
    gap, h, w = max(1, scale // 2), H * scale, W * scale
    grid_w, grid_h = cols * (w + gap) + gap, len(rows) * (h + gap) + gap
    left = 12 + 6 * max(map(len, row_labels), default=0)
    top, right = 44, 90 if colour_bar else 12
    png = base64.b64encode(png_bytes(rows, scale)).decode()
    out = svg_open(left + grid_w + right, top + grid_h + 8, title)
    out[0] = out[0].replace("<svg ", '<svg xmlns:xlink="http://www.w3.org/1999/xlink" ')
    out.append(f'<image x="{left}" y="{top}" width="{grid_w}" height="{grid_h}" '
               f'style="image-rendering:pixelated" href="data:image/png;base64,{png}" '
               f'xlink:href="data:image/png;base64,{png}"/>')
    for i, label in enumerate(row_labels):
        y = top + gap + i * (h + gap) + h / 2 + 4
        out.append(f'<text x="{left - 6}" y="{y:.1f}" text-anchor="end">{escape(label)}</text>')
    for j, label in enumerate(col_labels):
        x = left + gap + j * (w + gap) + w / 2
        out.append(f'<text x="{x:.1f}" y="{top - 6}" text-anchor="middle" font-size="10">'
                   f'{escape(label)}</text>')
    if colour_bar:
        lo, hi, label, colours = colour_bar
        x0, steps = left + grid_w + 14, 64
        values = np.linspace(hi, lo, steps)  # top to bottom
        for k, (r, g, b) in enumerate(colours(values)):
            out.append(f'<rect x="{x0}" y="{top + k * grid_h / steps:.2f}" width="14" '
                       f'height="{grid_h / steps + 0.5:.2f}" fill="rgb({r},{g},{b})"/>')
        for v in ticks(lo, hi, 5):
            y = top + (hi - v) / (hi - lo) * grid_h
            out.append(f'<text x="{x0 + 18}" y="{y + 4:.1f}">{v:g}</text>')
        out.append(f'<text x="{x0 + 66}" y="{top + grid_h / 2}" transform="rotate(90 '
                   f'{x0 + 66} {top + grid_h / 2})" text-anchor="middle">{escape(label)}</text>')
    return "\n".join(out + ["</svg>\n"])
