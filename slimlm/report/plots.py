"""Pareto plots of quality vs memory and quality vs speed, as inline SVG (matplotlib, no network).

Each point is one (run, variant): y = perplexity on the first corpus (lower is better), x = memory
(the load's RSS, MB) or decode tok/s at batch 1; the bubble area is the third quantity (speed on the
memory plot, memory on the speed plot), as in the Long Range Arena trade-off figure. Colour = machine.
The dashed line joins the Pareto-optimal points of each machine (nothing else is both better in
quality and in x). Text stays text in the SVG (``svg.fonttype: none``), so labels are searchable.
"""

from __future__ import annotations

import io
import re

from slimlm.report.data import MB, Point

PLOTS = {"quality-memory": "Quality vs memory (bubble: decode tok/s)",
         "quality-speed": "Quality vs decode speed (bubble: memory)"}


def pareto(xy: list[tuple[float, float]], higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats in both x and y (y lower is better), sorted by x."""
    keep = []
    for i, (x, y) in enumerate(xy):
        dominated = False
        for j, (x2, y2) in enumerate(xy):
            better_x = x2 > x if higher_x_better else x2 < x
            same_x = x2 == x
            if j != i and y2 <= y and (better_x or same_x) and (better_x or y2 < y):
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: xy[i][0])


def plot_svg(pts: list[Point], corpus: str, kind: str) -> str:
    """One plot (``kind`` in :data:`PLOTS`) as an ``<svg>`` element string."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for p in pts:
        y, mem, dec = p.ppl(corpus), p.memory_bytes, p.speed()
        if p.ok and y is not None and mem is not None and dec:
            rows.append((p, y, mem / MB, dec))
    machines = list(dict.fromkeys(p.machine for p, *_ in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    with plt.rc_context({"svg.fonttype": "none", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(7.0, 4.4))
        if not rows:
            ax.text(0.5, 0.5, "no variant has both a perplexity and a speed", ha="center", transform=ax.transAxes)
        top_mem = max((r[2] for r in rows), default=1.0)
        top_dec = max((r[3] for r in rows), default=1.0)
        for mi, m in enumerate(machines):
            mine = [r for r in rows if r[0].machine == m]
            xs = [r[2] if kind == "quality-memory" else r[3] for r in mine]
            ys = [r[1] for r in mine]
            third = [r[3] / top_dec if kind == "quality-memory" else r[2] / top_mem for r in mine]
            c = colors[mi % len(colors)]
            ax.scatter(xs, ys, s=[60 + 900 * t for t in third], color=c, alpha=0.45, edgecolors=c, label=m)
            for (p, *_), x, y in zip(mine, xs, ys, strict=True):
                ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
            front = pareto(list(zip(xs, ys, strict=True)), higher_x_better=kind == "quality-speed")
            if len(front) > 1:
                ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color=c, lw=1)
        ax.set_ylabel(f"perplexity on {corpus} (lower is better)")
        ax.set_xlabel("memory added by the load, MB (RSS; lower is better)" if kind == "quality-memory"
                      else "decode tok/s at batch 1 (higher is better)")
        ax.set_title(PLOTS[kind])
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.grid(alpha=0.3)
        if rows:
            ax.legend(fontsize=7, loc="best", title="machine", title_fontsize=7)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: the SVG sits inside HTML
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)  # no date stamp: same input, same page
    return re.sub(r"<svg ", f'<svg role="img" aria-label="{PLOTS[kind]}" ', svg, count=1)
