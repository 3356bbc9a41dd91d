"""The pictures a run writes, with the standard library only: sample grids as PNG (zlib +
struct) and the learning curve as SVG (text).
"""

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
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


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
