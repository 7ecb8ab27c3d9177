"""Static SVG charts for the report page, drawn by hand: no JavaScript, no fonts, no fetches.

Each function returns an `<svg>` element as Markup. Colours and fonts come from the page's
stylesheet through class names (`.c-better`, `.c-tuned`...), so the SVG carries no inline
styles and the page's Content-Security-Policy needs no 'unsafe-inline'. Every chart has a
<title> and <desc> for screen readers, and the numbers it shows are also in a table nearby.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

WIDTH = 640
# Difference below which a query counts as unchanged (ml_core.evaluation.paired_difference).
SAME = 1e-12


def _n(value: float) -> str:
    """A coordinate with two decimals and no trailing zeros (small, stable SVG)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _svg(height: float, title: str, desc: str, body: list[str]) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {_n(height)}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMinYMin meet">'
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>{''.join(body)}</svg>"
    )


def _text(x: float, y: float, label: str, cls: str = "", anchor: str = "start") -> str:
    klass = f' class="{cls}"' if cls else ""
    return (f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}"{klass}>'
            f"{escape(label)}</text>")


def _rect(x: float, y: float, w: float, h: float, cls: str, tip: str = "") -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    return (f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(max(w, 0.0))}" height="{_n(h)}" '
            f'class="{cls}">{title}</rect>')


def _line(x1: float, y1: float, x2: float, y2: float, cls: str) -> str:
    return f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" class="{cls}"/>'


def nice_step(span: float, ticks: int = 5) -> float:
    """A round tick step (1, 2 or 5 x 10^k) giving about `ticks` intervals over `span`."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _ticks(low: float, high: float, ticks: int = 5) -> list[float]:
    step = nice_step(high - low, ticks)
    first = math.ceil(low / step - 1e-9) * step
    out, value = [], first
    while value <= high + step * 1e-6:
        out.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return out


def _tick_label(value: float, step: float, signed: bool = False) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:+.{decimals}f}" if signed and value else f"{value:.{decimals}f}"


# ---------------------------------------------------------------------------------------------
# Charts


def interval(difference: float, low: float, high: float, metric: str = "nDCG@10") -> Markup:
    """The gain (tuned - base) as a point with its 95% interval, on an axis centred on 0."""
    extent = max(abs(low), abs(high), abs(difference)) * 1.25 or 0.01
    left, right, axis_y = 40.0, WIDTH - 40.0, 58.0

    def x(value: float) -> float:
        return left + (value + extent) / (2 * extent) * (right - left)

    body = [_rect(x(-extent), 18, x(0) - x(-extent), 24, "zone-worse"),
            _rect(x(0), 18, x(extent) - x(0), 24, "zone-better")]
    step = nice_step(2 * extent)
    for tick in _ticks(-extent, extent):
        body.append(_line(x(tick), axis_y - 4, x(tick), axis_y, "axis"))
        body.append(_text(x(tick), axis_y + 14, _tick_label(tick, step, True), "tick", "middle"))
    body.append(_line(left, axis_y, right, axis_y, "axis"))
    body.append(_line(x(0), 12, x(0), axis_y, "zero"))
    cls = "c-better" if low > 0 else "c-worse" if high < 0 else "c-same"
    body.append(_line(x(low), 30, x(high), 30, f"whisker {cls}"))
    for end in (low, high):
        body.append(_line(x(end), 24, x(end), 36, f"whisker {cls}"))
    body.append(f'<circle cx="{_n(x(difference))}" cy="30" r="6" class="{cls}"/>')
    body.append(_text(x(0) - 6, 12, "worse", "note", "end"))
    body.append(_text(x(0) + 6, 12, "better", "note"))
    desc = (f"{metric} gain {difference:+.4f}, 95% interval from {low:+.4f} to {high:+.4f}")
    return _svg(axis_y + 22, f"{metric} gain and its 95% interval", desc, body)


def outcomes(better: int, worse: int, same: int) -> Markup:
    """One stacked bar: how many queries got better, worse or stayed the same."""
    total = better + worse + same
    left, right = 0.0, float(WIDTH)
    body: list[str] = []
    position = left
    for count, cls, word in ((better, "c-better", "better"), (same, "c-same", "unchanged"),
                             (worse, "c-worse", "worse")):
        if not count:
            continue
        width = (right - left) * count / total
        body.append(_rect(position, 4, width, 28, cls, f"{count} {word}"))
        if width > 70:
            body.append(_text(position + width / 2, 23, f"{count} {word}", "on-bar", "middle"))
        elif width > 22:
            body.append(_text(position + width / 2, 23, str(count), "on-bar", "middle"))
        position += width
    desc = f"{better} queries better, {same} unchanged, {worse} worse, of {total}"
    return _svg(36, "Queries that got better, worse or stayed the same", desc, body)


@dataclass(frozen=True)
class Bin:
    """One histogram bar: queries whose difference lies in [low, high) (or is exactly 0)."""

    low: float
    high: float
    count: int
    kind: str  # "better" | "worse" | "same"


def difference_bins(differences: Sequence[float], bins: int = 10) -> list[Bin]:
    """Per-query differences binned symmetrically: `bins` bins each side of 0 (same width),
    and the exactly-unchanged queries as their own bin at 0."""
    extent = max((abs(d) for d in differences), default=0.0)
    if extent <= SAME:
        return [Bin(0.0, 0.0, len(differences), "same")]
    step = nice_step(extent, bins)
    sides = max(1, math.ceil(extent / step - 1e-9))
    worse = [0] * sides
    better = [0] * sides
    same = 0
    for d in differences:
        if abs(d) <= SAME:
            same += 1
            continue
        index = min(sides - 1, int(abs(d) / step))
        (better if d > 0 else worse)[index] += 1
    out = [Bin(-(i + 1) * step, -i * step, worse[i], "worse") for i in reversed(range(sides))]
    out.append(Bin(0.0, 0.0, same, "same"))
    out += [Bin(i * step, (i + 1) * step, better[i], "better") for i in range(sides)]
    return out


def histogram(differences: Sequence[float], metric: str = "nDCG@10") -> Markup:
    """The distribution of per-query differences (tuned - base), unchanged queries apart."""
    bins = difference_bins(differences)
    left, right, top, bottom = 40.0, WIDTH - 10.0, 10.0, 170.0
    tallest = max(b.count for b in bins) or 1
    slot = (right - left) / len(bins)
    body = []
    for tick in _ticks(0, tallest, 4):
        if tick != int(tick):
            continue
        y = bottom - (bottom - top) * tick / tallest
        body.append(_line(left, y, right, y, "grid"))
        body.append(_text(left - 6, y + 4, str(int(tick)), "tick", "end"))
    for i, b in enumerate(bins):
        height = (bottom - top) * b.count / tallest
        x = left + i * slot
        if b.kind == "same":
            tip = f"{b.count} queries unchanged"
        else:
            tip = f"{b.count} queries with a difference in [{b.low:+.3f}, {b.high:+.3f})"
        body.append(_rect(x + 2, bottom - height, slot - 4, height, f"c-{b.kind}", tip))
        if b.count:
            body.append(_text(x + slot / 2, bottom - height - 3, str(b.count), "count", "middle"))
    body.append(_line(left, bottom, right, bottom, "axis"))
    labelled = [b for b in bins if b.kind != "same"]
    step = labelled[0].high - labelled[0].low if labelled else 1.0
    sides = len(labelled) // 2
    every = max(1, math.ceil(sides / 4))
    centre = len(bins) // 2
    body.append(_text(left + (centre + 0.5) * slot, bottom + 15, "0", "tick", "middle"))
    for j in range(every, sides + 1, every):
        # The outer edge of the j-th bin on each side of the unchanged bar.
        for sign, x in ((-1, left + (centre - j) * slot), (1, left + (centre + 1 + j) * slot)):
            body.append(_text(x, bottom + 15, _tick_label(sign * j * step, step, True), "tick",
                              "middle"))
    body.append(_text(left + (right - left) / 2, bottom + 32,
                      f"per-query {metric} difference (tuned - base)", "note", "middle"))
    desc = "; ".join(
        f"{b.count} unchanged" if b.kind == "same"
        else f"{b.count} in [{b.low:+.3f}, {b.high:+.3f})"
        for b in bins
    )
    return _svg(bottom + 40, f"Distribution of per-query {metric} differences", desc, body)


@dataclass(frozen=True)
class Group:
    """One labelled group of bars: e.g. a query type with its base and tuned scores."""

    label: str
    values: tuple[float | None, ...]
    note: str = ""


def grouped_bars(
    groups: Sequence[Group], series: Sequence[tuple[str, str]], scale: float | None = None
) -> Markup:
    """Horizontal bars, one row per series in each group. `series` is [(name, css class)]; the
    value axis runs from 0 to `scale` (default: the largest value, rounded up)."""
    values = [v for g in groups for v in g.values if v is not None]
    top_value = scale or max(values + [1e-9])
    step = nice_step(top_value, 4)
    top_value = math.ceil(top_value / step - 1e-9) * step
    label_w, left, right = 150.0, 160.0, WIDTH - 60.0
    row, gap = 16.0, 12.0
    y = 6.0
    body = []
    for group in groups:
        group_h = row * len(series)
        body.append(_text(label_w, y + group_h / 2 + 4, group.label, "label", "end"))
        if group.note:
            body.append(_text(label_w, y + group_h / 2 + 16, group.note, "note", "end"))
        for (name, cls), value in zip(series, group.values, strict=True):
            if value is not None:
                width = (right - left) * value / top_value
                body.append(_rect(left, y + 1, width, row - 3, cls, f"{name}: {value:.4f}"))
                body.append(_text(left + width + 4, y + row - 4, f"{value:.3f}", "count"))
            y += row
        y += gap
    axis_y = y
    for tick in _ticks(0, top_value, 4):
        x = left + (right - left) * tick / top_value
        body.insert(0, _line(x, 2, x, axis_y, "grid"))
        body.append(_text(x, axis_y + 14, _tick_label(tick, step), "tick", "middle"))
    legend_x = left
    for name, cls in series:
        body.append(_rect(legend_x, axis_y + 24, 12, 12, cls))
        body.append(_text(legend_x + 16, axis_y + 34, name, "note"))
        legend_x += 24 + 7.5 * len(name)
    desc = "; ".join(
        f"{g.label}: " + ", ".join(
            f"{name} {v:.4f}" for (name, _), v in zip(series, g.values, strict=True)
            if v is not None
        )
        for g in groups
    )
    return _svg(axis_y + 42, ", ".join(name for name, _ in series), desc, body)


def epoch_lines(
    epochs: Sequence[int],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    kept_epoch: int | None,
    kept_label: str = "kept",
) -> Markup:
    """Loss per epoch, one line per series [(name, css class, values)]; the kept checkpoint's
    epoch is marked on the first series with a ring and a label."""
    points = [v for _, _, vals in series for v in vals if v is not None]
    low, high = (min(points), max(points)) if points else (0.0, 1.0)
    pad = (high - low) * 0.15 or abs(high) * 0.05 or 0.05
    low, high = low - pad, high + pad
    left, right, top, bottom = 56.0, WIDTH - 20.0, 14.0, 180.0
    first, last = (min(epochs), max(epochs)) if epochs else (0, 1)
    span = (last - first) or 1

    def x(epoch: float) -> float:
        return left + (epoch - first) / span * (right - left)

    def y(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    body = []
    step = nice_step(high - low, 4)
    for tick in _ticks(low, high, 4):
        body.append(_line(left, y(tick), right, y(tick), "grid"))
        body.append(_text(left - 6, y(tick) + 4, _tick_label(tick, step / 10), "tick", "end"))
    every = max(1, math.ceil(len(epochs) / 12))
    for i, epoch in enumerate(epochs):
        if i % every == 0 or epoch == last:
            body.append(_text(x(epoch), bottom + 15, str(epoch), "tick", "middle"))
    body.append(_line(left, bottom, right, bottom, "axis"))
    body.append(_text((left + right) / 2, bottom + 32, "epoch (0 = the base model)", "note",
                      "middle"))
    for name, cls, values in series:
        coords = [(x(e), y(v)) for e, v in zip(epochs, values, strict=True) if v is not None]
        if len(coords) > 1:
            path = " ".join(f"{_n(px)},{_n(py)}" for px, py in coords)
            body.append(f'<polyline points="{path}" class="line {cls}"/>')
        for (px, py), (e, v) in zip(
            coords, [(e, v) for e, v in zip(epochs, values, strict=True) if v is not None],
            strict=True,
        ):
            body.append(f'<circle cx="{_n(px)}" cy="{_n(py)}" r="3" class="dot {cls}">'
                        f"<title>{escape(name)}, epoch {e}: {v:.4f}</title></circle>")
    if kept_epoch is not None and kept_epoch in epochs and series:
        value = series[0][2][list(epochs).index(kept_epoch)]
        if value is not None:
            cx, cy = x(kept_epoch), y(value)
            body.append(f'<circle cx="{_n(cx)}" cy="{_n(cy)}" r="8" class="kept"/>')
            anchor = "end" if cx > (left + right) / 2 else "start"
            offset = -12 if anchor == "end" else 12
            body.append(_text(cx + offset, cy - 10, kept_label, "kept-label", anchor))
    legend_x = left
    for name, cls, _ in series:
        body.append(_line(legend_x, bottom + 46, legend_x + 18, bottom + 46, f"line {cls}"))
        body.append(_text(legend_x + 22, bottom + 50, name, "note"))
        legend_x += 40 + 7.5 * len(name)
    desc = "; ".join(
        f"{name}: " + ", ".join(
            f"epoch {e} {v:.4f}" for e, v in zip(epochs, values, strict=True) if v is not None
        )
        for name, _, values in series
    ) + (f"; kept checkpoint: epoch {kept_epoch}" if kept_epoch is not None else "")
    return _svg(bottom + 58, "Loss per epoch", desc, body)
