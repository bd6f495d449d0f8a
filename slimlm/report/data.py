"""Results -> report rows: one :class:`Point` per (run, variant), its base, and its verdict.

Every ratio compares a variant with the base of its *own* run (same machine, same day, same
settings), never across runs: numbers from two machines are shown side by side, labelled, not mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimlm.bench.machine import machine_label

MB = 1e6


@dataclass
class Point:
    run: dict[str, Any]
    variant: dict[str, Any]
    base: dict[str, Any] | None  # the run's base variant (None when it failed)

    @property
    def label(self) -> str:
        return str(self.variant["label"])

    @property
    def ok(self) -> bool:
        return self.variant["status"] == "ok"

    @property
    def machine(self) -> str:
        return machine_label(self.run["machine"])

    @property
    def date(self) -> str:
        return str(self.run["started"])[:16].replace("T", " ")

    @property
    def where(self) -> str:
        return f"{self.machine}, {self.date}"

    def ppl(self, corpus: str) -> float | None:
        p = self.variant.get("perplexity", {}).get(corpus)
        return float(p["perplexity"]) if p else None

    def speed(self, key: str = "decode_tok_s") -> float | None:
        s = self.variant.get("speed", {}).get(key)
        return float(s["median"]) if s else None

    @property
    def memory_bytes(self) -> int | None:
        """Resident memory the variant's load added (RSS after the load minus before it)."""
        m = self.variant.get("memory")
        return int(m["load_rss_bytes"]) if m else None


def points(runs: list[dict[str, Any]], base: str | None = None) -> list[Point]:
    """Every (run, variant), in file order; ``base`` overrides each run's base label where present."""
    out = []
    for run in runs:
        by_label = {v["label"]: v for v in run["variants"]}
        b = by_label.get(base or "") or by_label[run["base"]]
        for v in run["variants"]:
            out.append(Point(run, v, b if b["status"] == "ok" else None))
    return out


def corpora(runs: list[dict[str, Any]]) -> list[str]:
    """Corpus names in first-seen order."""
    seen: dict[str, None] = {}
    for r in runs:
        for c in r["corpora"]:
            seen.setdefault(c["name"], None)
    return list(seen)


def _ratio(x: float, word_up: str, word_down: str) -> str:
    return f"{x:.1f}x {word_up}" if x >= 1 else f"{1 / x:.1f}x {word_down}"


def verdict(p: Point) -> str:
    """One line from the numbers, e.g. ``gptq-w4: 3.8x smaller, 2.1x faster decode, +6% ppl``."""
    v = p.variant
    if not p.ok:
        return f"{p.label}: failed ({v['error']})"
    b = p.base
    if b is None:
        return f"{p.label}: no verdict (the base variant failed)"
    if b is v:
        dec = p.speed()
        first = next(iter(v["perplexity"].values()), None)
        return (f"{p.label}: base, {v['weight_bytes'] / MB:.1f} MB of weights, "
                + (f"{dec:.1f} tok/s decode" if dec else "no decode rate")
                + (f", ppl {first['perplexity']:.2f}" if first else ""))
    bp = Point(p.run, b, b)
    parts = [_ratio(b["weight_bytes"] / max(v["weight_bytes"], 1), "smaller", "larger")]
    d, bd = p.speed(), bp.speed()
    if d and bd:
        parts.append(_ratio(d / bd, "faster decode", "slower decode"))
    shared = [c for c in v["perplexity"] if c in b["perplexity"]]
    if shared:
        c = shared[0]
        delta = 100 * (v["perplexity"][c]["perplexity"] / b["perplexity"][c]["perplexity"] - 1)
        parts.append(f"{delta:+.1f}% ppl" if abs(round(delta, 1)) < 10 else f"{delta:+.0f}% ppl")
    return f"{p.label}: " + ", ".join(parts)


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def compare_lines(run: dict[str, Any], previous: list[dict[str, Any]]) -> list[str]:
    """What ``slimlm bench`` prints: the run's verdicts and, per label benched before, the change
    since the latest earlier run of that label (perplexity on a shared corpus, decode rate)."""
    pts = points([run])
    lines = [f"machine: {machine_label(run['machine'])}; bandwidth {run['machine']['bandwidth_GBps']:.1f} GB/s, "
             f"GEMM fp32 {run['machine']['gemm_gflops'].get('fp32', 0):.0f} GFLOP/s"]
    for p in pts:
        lines.append(verdict(p))
        if not p.ok:
            continue
        v = p.variant
        dec, spread = p.speed(), v["speed"].get("decode_tok_s", {}).get("spread", 0.0)
        ppl = "; ".join(f"{c} ppl {x['perplexity']:.3f}" for c, x in v["perplexity"].items())
        lines.append(f"    {ppl}; decode {fmt(dec)} tok/s (spread {100 * spread:.0f}%), prefill "
                     f"{fmt(p.speed('prefill_tok_s'), 0)} tok/s, TTFT {fmt((p.speed('ttft_s') or 0) * 1e3)} ms, "
                     f"load RSS {fmt((p.memory_bytes or 0) / MB)} MB, peak RSS {v['memory']['peak_rss_bytes'] / MB:.0f} MB")
        before = [q for r in previous for q in points([r]) if q.label == p.label and q.ok]
        if before:
            q = before[-1]
            same = [c for c in v["perplexity"] if c in q.variant["perplexity"]]
            bits = [f"vs run {q.run['run_id']} ({q.where})"]
            if same:
                bits.append(f"ppl {q.ppl(same[0]):.3f} -> {p.ppl(same[0]):.3f}")
            if dec and q.speed():
                bits.append(f"decode {dec / q.speed():.2f}x")  # type: ignore[operator]
            lines.append("    " + ", ".join(bits))
    return lines
