"""The figures, the summary table, the ratio tables and the issue's targets (pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.stats import ratio

__all__ = [
    "FIGURES",
    "FIGURE_KEYS",
    "GROUPS",
    "Figure",
    "formatTable",
    "formatValue",
    "summaryTable",
    "ratioTable",
    "targetRows",
    "targetTable",
]


@dataclass(frozen=True)
class Figure:
    key: str
    header: str
    unit: str
    group: str  # the measurement that produces it (a --figures name)
    higherIsBetter: bool
    digits: int


#: Every figure of the table, in column order.
FIGURES: tuple[Figure, ...] = (
    Figure("bulk_up", "up MB/s", "MB/s", "bulk", True, 0),
    Figure("bulk_down", "down MB/s", "MB/s", "bulk", True, 0),
    Figure("setup_p50", "setup p50 ms", "ms", "latency", False, 2),
    Figure("setup_p99", "setup p99 ms", "ms", "latency", False, 2),
    Figure("concurrent", "100x1MiB MB/s", "MB/s", "concurrent", True, 0),
    Figure("cpu_per_gib", "CPU s/GiB", "s/GiB", "bulk", False, 2),
    Figure("peak_rss", "peak RSS MiB", "MiB", "any", False, 1),
    Figure("idle_rss", "idle KiB/tun", "KiB", "idle", False, 1),
    Figure("idle_pss", "idle PSS KiB/tun", "KiB", "idle", False, 1),
)
FIGURE_KEYS = tuple(f.key for f in FIGURES)
#: The --figures names, in the order they run for each system.
GROUPS = ("latency", "idle", "concurrent", "bulk")


def formatValue(value: float | None, digits: int) -> str:
    """A figure as text: ``-`` when missing; fewer decimals for large values."""
    if value is None:
        return "-"
    if digits and abs(value) >= 1000:
        digits = 0
    return f"{value:,.{digits}f}"


def formatTable(headers: Sequence[str], rows: Sequence[Sequence[str]], alignLeft: int = 1) -> str:
    """A Markdown table (readable as plain text): the first ``alignLeft`` columns
    are left-aligned, the others right-aligned; every cell padded to its column."""
    columns = len(headers)
    for row in rows:
        if len(row) != columns:
            raise ValueError(f"row {row!r} has {len(row)} cells, expected {columns}")
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if i < alignLeft else cell.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    rule = "| " + " | ".join(
        ("-" * w if i < alignLeft else "-" * (w - 1) + ":") for i, w in enumerate(widths)
    ) + " |"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def summaryTable(results: Mapping[str, Mapping[str, float | None]], systems: Sequence[str]) -> str:
    """One row per system, one column per figure."""
    rows = []
    for name in systems:
        figures = results.get(name, {})
        rows.append([name, *(formatValue(figures.get(f.key), f.digits) for f in FIGURES)])
    return formatTable(["system", *(f.header for f in FIGURES)], rows)


def _ratioCell(value: float | None, reference: float | None) -> str:
    r = ratio(value, reference)
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 100 else f"{r:,.0f}x"


def ratioTable(
    results: Mapping[str, Mapping[str, float | None]],
    systems: Sequence[str],
    reference: str,
) -> str:
    """Each figure divided by ``reference``'s (``-`` where either is missing).

    Throughput ratios above 1 are better; latency, CPU and memory ratios below 1."""
    ref = results.get(reference, {})
    rows = []
    for name in systems:
        figures = results.get(name, {})
        rows.append([name, *(_ratioCell(figures.get(f.key), ref.get(f.key)) for f in FIGURES)])
    return formatTable([f"vs {reference}", *(f.header for f in FIGURES)], rows)


@dataclass(frozen=True)
class _Target:
    text: str
    key: str
    absolute: float | None = None  # hbone's figure compared with this bound
    relative: float | None = None  # hbone / stunnel compared with this bound


#: The issue's targets for hbone (ratios are to stunnel in the same run).
TARGETS: tuple[_Target, ...] = (
    _Target("bulk up >= 1.0x stunnel", "bulk_up", relative=1.0),
    _Target("bulk down >= 1.0x stunnel", "bulk_down", relative=1.0),
    _Target("setup p50 <= 1.5 ms and <= 0.3x stunnel", "setup_p50", absolute=1.5, relative=0.3),
    _Target("setup p99 <= 5 ms", "setup_p99", absolute=5.0),
    _Target("CPU per GiB <= 1.0x stunnel", "cpu_per_gib", relative=1.0),
    _Target("100 concurrent tunnels >= 1.0x stunnel", "concurrent", relative=1.0),
    _Target("idle tunnel, both sides <= 10 KiB", "idle_rss", absolute=10.0),
)


def targetRows(
    results: Mapping[str, Mapping[str, float | None]], system: str = "hbone", reference: str = "stunnel"
) -> list[tuple[str, str, str, str, str]]:
    """``(target, hbone, stunnel, ratio, verdict)`` per target; the verdict is
    ``met``, ``MISSED`` or ``n/a`` (a figure was not measured)."""
    byKey = {f.key: f for f in FIGURES}
    mine = results.get(system, {})
    ref = results.get(reference, {})
    rows = []
    for t in TARGETS:
        fig = byKey[t.key]
        value, refValue = mine.get(t.key), ref.get(t.key)
        r = ratio(value, refValue)
        checks = []
        if t.absolute is not None:
            checks.append(None if value is None else (value >= t.absolute if fig.higherIsBetter else value <= t.absolute))
        if t.relative is not None:
            checks.append(None if r is None else (r >= t.relative if fig.higherIsBetter else r <= t.relative))
        if any(c is None for c in checks):
            verdict = "n/a"
        else:
            verdict = "met" if all(checks) else "MISSED"
        rows.append((
            t.text,
            f"{formatValue(value, fig.digits)} {fig.unit}" if value is not None else "-",
            f"{formatValue(refValue, fig.digits)} {fig.unit}" if refValue is not None else "-",
            f"{r:.2f}x" if r is not None else "-",
            verdict,
        ))
    return rows


def targetTable(results: Mapping[str, Mapping[str, float | None]], system: str = "hbone",
                reference: str = "stunnel") -> str:
    return formatTable(
        ["target", system, reference, "ratio", "verdict"],
        [list(r) for r in targetRows(results, system, reference)],
    )
