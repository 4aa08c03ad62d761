"""A PNG plot of evaluation curves (OPD vs EOPD): with matplotlib when it is installed (optional),
else, when asked (``force=True``), with a small built-in renderer (lines, bands, a 3x5 pixel font)
so that a run folder always gets its plot."""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["matplotlib_available", "plot_curves"]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_curves(
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float, float]]]],
    path: str | os.PathLike,
    title: str = "OPD vs EOPD",
    xlabel: str = "iteration",
    force: bool = False,
) -> Path | None:
    """Write one panel per metric, one line per method, to a PNG; None without matplotlib
    (unless ``force``: then the built-in renderer draws it).

    Args:
        curves: ``curves[metric][method]`` is a list of ``(x, mean, spread)`` points; the spread
            (e.g. the standard deviation over seeds; 0 for a single run) is drawn as a band.
        path: the PNG file to write.
        title: figure title.
        xlabel: label of the x axis.
        force: without matplotlib, draw with the built-in renderer instead of returning None.

    Returns:
        The written path, or None when matplotlib is not installed and ``force`` is false.
    """
    if not matplotlib_available():
        if not force:
            return None
        return _plot_builtin(curves, path, title, xlabel)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(curves)
    if not metrics:
        raise ValueError("no curves to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for method, points in curves[metric].items():
            pts = sorted(points)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            sd = [p[2] for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=method)
            ax.fill_between(
                xs,
                [y - s for y, s in zip(ys, sd)],
                [y + s for y, s in zip(ys, sd)],
                color=line.get_color(),
                alpha=0.2,
            )
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# -- a dependency-free renderer -------------------------------------------------------------------

_GLYPHS = {
    "0": "111101101101111",
    "1": "010110010010111",
    "2": "111001111100111",
    "3": "111001111001111",
    "4": "101101111001001",
    "5": "111100111001111",
    "6": "111100111101111",
    "7": "111001001010010",
    "8": "111101111101111",
    "9": "111101111001111",
    "a": "010101111101101",
    "b": "110101110101110",
    "c": "011100100100011",
    "d": "110101101101110",
    "e": "111100110100111",
    "f": "111100110100100",
    "g": "011100101101011",
    "h": "101101111101101",
    "i": "111010010010111",
    "j": "001001001101010",
    "k": "101101110101101",
    "l": "100100100100111",
    "m": "101111111101101",
    "n": "110101101101101",
    "o": "010101101101010",
    "p": "110101110100100",
    "q": "010101101110011",
    "r": "110101110101101",
    "s": "011100010001110",
    "t": "111010010010010",
    "u": "101101101101111",
    "v": "101101101101010",
    "w": "101101111111101",
    "x": "101101010101101",
    "y": "101101010010010",
    "z": "111001010100111",
    ".": "000000000000010",
    "-": "000000111000000",
    "+": "000010111010000",
    "@": "010101111100011",
    "/": "001001010100100",
    "(": "010100100100010",
    ")": "010001001001010",
    "%": "101001010100101",
    "_": "000000000000111",
    ",": "000000000010100",
    ":": "000010000010000",
    "=": "000111000111000",
    "|": "010010010010010",
    " ": "000000000000000",
}
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


class _Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(color)

    def line(self, x0, y0, x1, y1, color, thick: int = 1) -> None:
        x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(thick):
                for oy in range(thick):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 2) -> None:
        for ch in text.lower():
            glyph = _GLYPHS.get(ch, _GLYPHS[" "])
            for r in range(5):
                for c in range(3):
                    if glyph[r * 3 + c] == "1":
                        for a in range(scale):
                            for b in range(scale):
                                self.set(x + c * scale + a, y + r * scale + b, color)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(
            b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h)
        )

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))  # fmt: skip


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _plot_builtin(curves, path, title: str, xlabel: str) -> Path:
    """Draw ``curves`` (as :func:`plot_curves`) without matplotlib."""
    metrics = list(curves)
    if not metrics:
        raise ValueError("no curves to plot")
    pw, ph, top = 440, 330, 36
    ncol = min(3, len(metrics))
    nrow = -(-len(metrics) // ncol)
    cv = _Canvas(pw * ncol, ph * nrow + top)
    cv.text(8, 8, title, scale=3)
    for n, metric in enumerate(metrics):
        px, py = (n % ncol) * pw, top + (n // ncol) * ph
        x0, y0 = px + 70, py + 30
        x1, y1 = px + pw - 30, py + ph - 70
        pts_all = [p for pts in curves[metric].values() for p in pts]
        if not pts_all:
            continue
        xs = [p[0] for p in pts_all]
        lo = min(p[1] - p[2] for p in pts_all)
        hi = max(p[1] + p[2] for p in pts_all)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = 0.0, 1.0
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.05 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        xmin, xmax = min(xs), max(xs)
        if xmax == xmin:
            xmax = xmin + 1

        def to_px(x, y, xmin=xmin, xmax=xmax, lo=lo, hi=hi, x0=x0, x1=x1, y0=y0, y1=y1):
            return (x0 + (x - xmin) / (xmax - xmin) * (x1 - x0),
                    y1 - (y - lo) / (hi - lo) * (y1 - y0))  # fmt: skip

        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            gy = y1 - frac * (y1 - y0)
            cv.line(x0, gy, x1, gy, (225, 225, 225))
            cv.text(px + 20, int(gy) - 4, _fmt(lo + frac * (hi - lo)), scale=1)
        cv.line(x0, y0, x0, y1, (0, 0, 0))
        cv.line(x0, y1, x1, y1, (0, 0, 0))
        cv.text(x0, y1 + 8, _fmt(xmin), scale=1)
        cv.text(x1 - 4 * len(_fmt(xmax)), y1 + 8, _fmt(xmax), scale=1)
        cv.text((x0 + x1) // 2 - 4 * len(xlabel), y1 + 8, xlabel, scale=2)
        cv.text(x0, py + 6, metric, scale=2)
        for m, (method, points) in enumerate(curves[metric].items()):
            color = _COLORS[m % len(_COLORS)]
            light = tuple(int(c + (255 - c) * 0.75) for c in color)
            pts = sorted(points)
            for (xa, ya, sa), (xb, yb, sb) in zip(pts, pts[1:]):  # band
                pa_lo, pa_hi = to_px(xa, ya - sa)[1], to_px(xa, ya + sa)[1]
                pb_lo, pb_hi = to_px(xb, yb - sb)[1], to_px(xb, yb + sb)[1]
                ca, cb = int(to_px(xa, 0)[0]), int(to_px(xb, 0)[0])
                for col in range(ca, max(cb, ca + 1)):
                    t = (col - ca) / max(cb - ca, 1)
                    ylo, yhi = pa_lo + t * (pb_lo - pa_lo), pa_hi + t * (pb_hi - pa_hi)
                    for row in range(int(yhi), int(ylo) + 1):
                        cv.set(col, row, light)
            for (xa, ya, _), (xb, yb, _) in zip(pts, pts[1:]):
                cv.line(*to_px(xa, ya), *to_px(xb, yb), color, thick=2)
            for x, y, _ in pts:
                px, py = to_px(x, y)
                for a in range(-2, 3):
                    for b in range(-2, 3):
                        cv.set(int(px) + a, int(py) + b, color)
            ly = y1 + 24 + 12 * m
            cv.line(x0, ly + 4, x0 + 16, ly + 4, color, thick=2)
            cv.text(x0 + 22, ly, method, color=(0, 0, 0), scale=2)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(cv.png())
    return out
