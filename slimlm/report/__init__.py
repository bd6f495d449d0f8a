"""``slimlm report``: bench results -> one self-contained HTML page (or Markdown for READMEs).

The HTML needs no network: the style is inline and the plots are inline SVG. It holds the verdict
per variant, a table per corpus, a speed and memory table, two Pareto plots per corpus (quality vs
memory, quality vs speed) and the machine and software of every run. Example::

    write_report(["results.json"], "report.html")
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from slimlm.bench.machine import machine_label
from slimlm.bench.results import read_results
from slimlm.report.data import MB, Point, corpora, fmt, points, verdict
from slimlm.report.plots import PLOTS, plot_svg
from slimlm.utils.errors import SlimlmError

__all__ = ["load_runs", "render_html", "render_markdown", "write_report"]


def load_runs(paths: list[str]) -> list[dict[str, Any]]:
    """Every run of every file (each file checked against the schema), a run seen twice kept once."""
    runs: dict[str, dict[str, Any]] = {}
    for p in paths:
        for r in read_results(p)["runs"]:
            runs.setdefault(r["run_id"], r)
    if not runs:
        raise SlimlmError(f"{', '.join(paths)}: no runs to report")
    return list(runs.values())


def _pct(p: Point, corpus: str) -> str:
    y = p.ppl(corpus)
    by = Point(p.run, p.base, p.base).ppl(corpus) if p.base is not None else None
    return "-" if y is None or not by else f"{100 * (y / by - 1):+.1f}%"


def _spread(p: Point, key: str) -> str:
    s = p.variant.get("speed", {}).get(key)
    return "-" if not s else f"{s['median']:.1f} ±{100 * s['spread'] / 2:.0f}%"


def corpus_rows(pts: list[Point], corpus: str) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "machine, date", "perplexity", "vs base", "bits/weight", "weights MB", "decode tok/s"]
    rows = []
    for p in pts:
        if not p.ok:
            rows.append([p.label, p.where, "failed", "-", "-", "-", "-"])
            continue
        v = p.variant
        rows.append([p.label, p.where, fmt(p.ppl(corpus), 3), _pct(p, corpus), f"{v['bits_per_weight']:.2f}",
                     f"{v['weight_bytes'] / MB:.1f}", fmt(p.speed())])
    return head, rows


def speed_rows(pts: list[Point]) -> tuple[list[str], list[list[str]]]:
    head = ["variant", "machine, date", "disk MB", "load RSS MB", "peak RSS MB", "KV KB/token", "prefill tok/s",
            "TTFT ms", "decode tok/s (b1, ±half-spread)", "decode tok/s (concurrent)"]
    rows = []
    for p in pts:
        if not p.ok:
            rows.append([p.label, p.where, "failed: " + str(p.variant["error"])] + ["-"] * 7)
            continue
        v, m = p.variant, p.variant["memory"]
        conc = p.run["settings"]["concurrency"]
        rows.append([p.label, p.where, f"{v['size_on_disk_bytes'] / MB:.1f}", f"{m['load_rss_bytes'] / MB:.1f}",
                     f"{m['peak_rss_bytes'] / MB:.0f}", f"{m['kv_cache_bytes_per_token'] / 1e3:.1f}",
                     fmt(p.speed("prefill_tok_s"), 0), fmt((p.speed("ttft_s") or 0) * 1e3),
                     _spread(p, "decode_tok_s"),
                     (_spread(p, "decode_tok_s_concurrent") + f" ({conc} streams)") if conc > 1 else "-"])
    return head, rows


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower() or "corpus"


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _runs_section(runs: list[dict[str, Any]]) -> str:
    items = []
    for r in runs:
        m, s = r["machine"], r["settings"]
        sw = ", ".join(f"{k} {v}" for k, v in r["software"].items())
        items.append(
            f"<li><b>run {html.escape(r['run_id'])}</b> on <b>{html.escape(machine_label(m))}</b>, "
            f"{html.escape(r['started'])}: {html.escape(m['cpu_capability'])} ({html.escape(' '.join(m['cpu_flags']))}), "
            f"{m['cores']} cores, read bandwidth {m['bandwidth_GBps']:.1f} GB/s, GEMM "
            + ", ".join(f"{k} {v:.0f}" for k, v in m["gemm_gflops"].items())
            + f" GFLOP/s; prompt {s['prompt_tokens']} tokens, {s['new_tokens']} new, {s['repeats']} interleaved "
            f"rounds after {s['warmup']} warm-up; perplexity windows of {s['seq_len']}, first {s['max_tokens']} "
            f"tokens; software: {html.escape(sw)}<br><code>{html.escape(r['command'])}</code></li>")
    return "<ul>" + "".join(items) + "</ul>"


MARK = "slimlm report"  # in every report written: an existing --out without it is never replaced
CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}th{background:#eef}figure{display:inline-block;margin:0 1em 1em 0}
.verdicts li{font-family:monospace;margin:2px 0}svg{max-width:100%;height:auto}"""


def render_html(runs: list[dict[str, Any]], base: str | None = None) -> str:
    pts = points(runs, base)
    names = corpora(runs)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='generator' content='{MARK}'><title>slimlm bench report</title>"
             f"<style>{CSS}</style></head><body><h1>slimlm bench report</h1>",
             f"<p>{len(runs)} run(s) on {len({machine_label(r['machine']) for r in runs})} machine(s), "
             f"{len(pts)} measured variants. Ratios compare each variant with the base of its own run.</p>",
             "<h2>Verdicts</h2><ul class='verdicts'>"]
    parts += [f"<li data-variant='{html.escape(p.label)}'>{html.escape(verdict(p))} "
              f"<small>[{html.escape(p.where)}]</small></li>" for p in pts]
    parts.append("</ul>")
    for c in names:
        parts.append(f"<h2>Perplexity on {html.escape(c)}</h2>" + _table(*corpus_rows(pts, c)))
        for kind in PLOTS:
            parts.append(f"<figure class='plot' id='plot-{kind}-{_slug(c)}'>{plot_svg(pts, c, kind)}</figure>")
    parts.append("<h2>Speed and memory</h2>" + _table(*speed_rows(pts)))
    parts.append("<h2>Runs</h2>" + _runs_section(runs) + "</body></html>")
    return "\n".join(parts)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in esc])


def render_markdown(runs: list[dict[str, Any]], base: str | None = None) -> str:
    pts = points(runs, base)
    out = [f"<!-- {MARK} -->", "## slimlm bench", "", *[f"- `{verdict(p)}` ({p.where})" for p in pts], ""]
    for c in corpora(runs):
        out += [f"### Perplexity on {c}", "", _md_table(*corpus_rows(pts, c)), ""]
    out += ["### Speed and memory", "", _md_table(*speed_rows(pts)), "", "Machines:", ""]
    out += [f"- {machine_label(r['machine'])}: read bandwidth {r['machine']['bandwidth_GBps']:.1f} GB/s, run "
            f"{r['run_id']} at {r['started']}" for r in runs]
    return "\n".join(out) + "\n"


def write_report(paths: list[str], out: str, fmt: str | None = None, base: str | None = None) -> tuple[Path, int]:
    """Render the runs of ``paths`` to ``out`` (temp file + rename); returns (path, variants shown)."""
    from slimlm.bench.results import write_text

    o = Path(out)
    kind = fmt or ("md" if o.suffix.lower() in (".md", ".markdown") else "html")
    if o.is_dir():
        raise SlimlmError(f"{o}: is a folder; --out names the report file")
    if not o.parent.exists():
        raise SlimlmError(f"{o.parent}: no such folder for the report")
    if o.is_file() and MARK not in o.read_text(encoding="utf-8", errors="replace")[:2000]:
        raise SlimlmError(f"{o}: exists and is not a report slimlm wrote; choose another --out")
    runs = load_runs(paths)
    text = render_markdown(runs, base) if kind == "md" else render_html(runs, base)
    write_text(text, o)
    return o, len(points(runs, base))
