"""``python -m bench`` options -> :class:`Config` (pure: no I/O)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import GROUPS
from bench.stats import KiB, MiB
from bench.systems import SYSTEMS

__all__ = ["Config", "DEFAULTS", "QUICK", "parseArgs", "parser"]

#: Full run: what docs/performance.md records (about 2.5 minutes on 2 cores).
DEFAULTS = {
    "bulk_mib": 256.0,
    "bulk_reps": 3,
    "latency_count": 2000,
    "latency_warmup": 50,
    "tunnels": 100,
    "concurrent_kib": 1024.0,
    "concurrent_reps": 3,
    "idle": 1000,
    "time_limit": 540.0,
}
#: ``--quick``: the same steps, smaller (well under a minute).
QUICK = {
    "bulk_mib": 64.0,
    "bulk_reps": 1,
    "latency_count": 500,
    "latency_warmup": 20,
    "tunnels": 100,
    "concurrent_kib": 256.0,
    "concurrent_reps": 1,
    "idle": 300,
    "time_limit": 150.0,
}

#: Per step and system, however large the counts: a step stops when its time is up.
STEP_SECONDS = {"latency": 100.0, "idle": 90.0, "concurrent": 60.0, "bulk": 150.0}


@dataclass(frozen=True)
class Config:
    systems: tuple[str, ...] = SYSTEMS
    figures: tuple[str, ...] = GROUPS
    bulkBytes: int = 256 * MiB
    bulkReps: int = 3
    latencyCount: int = 2000
    latencyWarmup: int = 50
    tunnels: int = 100
    concurrentBytes: int = 1 * MiB
    concurrentReps: int = 3
    idleTunnels: int = 1000
    timeLimit: float = 570.0
    stepSeconds: dict = field(default_factory=lambda: dict(STEP_SECONDS))
    outDir: Path = Path("bench/results")
    profileDir: Path | None = None
    profileNative: bool = False
    profileRate: int = 250
    install: bool = True
    keep: bool = False
    quick: bool = False
    describe: bool = False
    report: Path | None = None
    hboneTree: Path | None = None


def _names(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    aliases = {"stunnel4": "stunnel", "nghttp2": "nghttpx", "nghttp2-proxy": "nghttpx"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)} (choose from {','.join(allowed)})")
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} given")
    # keep the canonical order, drop duplicates
    return tuple(n for n in allowed if n in names)


def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    convert.__name__ = kind.__name__
    return convert


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Side-by-side benchmark on 127.0.0.1: raw, socat, stunnel4 (mTLS), nghttpx "
            "--http2-proxy (+tinyproxy) and hbone, each measured the same way; prints one "
            "table, the ratios to raw and to stunnel, the issue's targets for hbone, and "
            "writes JSON lines to bench/results/."
        ),
        epilog=(
            "figures, in the order they run: latency (setup: connect, 1-byte echo, close; "
            "p50/p99), idle (memory per idle tunnel with N open), concurrent (100 tunnels each echoing 1 MiB), bulk "
            "(one tunnel each direction, median of reps; CPU s/GiB over the bulk step). "
            "Peak RSS is read after every step. Every loop is bounded in count and time."
        ),
    )
    p.add_argument("--systems", type=lambda t: _names(t, SYSTEMS, "system"), default=SYSTEMS,
                   help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)")
    p.add_argument("--figures", type=lambda t: _names(t, GROUPS, "figure"), default=GROUPS,
                   help=f"comma-separated subset of {','.join(GROUPS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller counts, about one minute in all")
    p.add_argument("--scale", type=_positive(float), default=1.0,
                   help="multiply every size and count (not repetitions) by this factor")
    p.add_argument("--bulk-mib", type=_positive(float), help=f"bytes per bulk transfer, MiB (default {DEFAULTS['bulk_mib']:g})")
    p.add_argument("--bulk-reps", type=_positive(int), help=f"bulk transfers per direction (default {DEFAULTS['bulk_reps']})")
    p.add_argument("--latency-count", type=_positive(int), help=f"setup-latency rounds (default {DEFAULTS['latency_count']})")
    p.add_argument("--latency-warmup", type=int, help=f"rounds discarded first (default {DEFAULTS['latency_warmup']})")
    p.add_argument("--tunnels", type=_positive(int), help=f"concurrent tunnels (default {DEFAULTS['tunnels']})")
    p.add_argument("--concurrent-kib", type=_positive(float), help=f"bytes each concurrent tunnel echoes, KiB (default {DEFAULTS['concurrent_kib']:g})")
    p.add_argument("--concurrent-reps", type=_positive(int), help=f"concurrent rounds (default {DEFAULTS['concurrent_reps']})")
    p.add_argument("--idle", type=_positive(int), help=f"idle tunnels held open (default {DEFAULTS['idle']})")
    p.add_argument("--time-limit", type=_positive(float),
                   help=f"stop starting steps after this many seconds (default {DEFAULTS['time_limit']:g}; quick {QUICK['time_limit']:g})")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the JSON lines (default bench/results)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="py-spy the hbone server and client during hbone's bulk step; speedscope files "
                        "and a summary go to DIR (profiling slows hbone: run it apart, e.g. "
                        "--systems hbone --figures bulk)")
    p.add_argument("--profile-native", action="store_true", help="with --profile: include C frames (py-spy --native)")
    p.add_argument("--profile-rate", type=_positive(int), default=250, help="with --profile: samples per second (default 250)")
    p.add_argument("--no-install", dest="install", action="store_false",
                   help="never apt-get install missing peers (they are skipped, with the command to install them)")
    p.add_argument("--hbone-tree", type=Path, metavar="DIR",
                   help="run hbone from this source tree instead of this checkout (e.g. a clone at "
                        "another commit: measure before and after a change)")
    p.add_argument("--keep", action="store_true", help="keep the run directory (configs, certificates, logs)")
    p.add_argument("--describe", action="store_true", help="print the machine description (Markdown) and exit")
    p.add_argument("--report", type=Path, metavar="FILE.jsonl", help="print the tables of a recorded run and exit")
    return p


def parseArgs(argv: list[str] | None = None) -> Config:
    options = parser().parse_args(argv)
    preset = QUICK if options.quick else DEFAULTS

    def pick(name):
        value = getattr(options, name)
        return preset[name] if value is None else value

    scale = options.scale
    return Config(
        systems=options.systems,
        figures=options.figures,
        bulkBytes=max(1, int(pick("bulk_mib") * MiB * scale)),
        bulkReps=pick("bulk_reps"),
        latencyCount=max(1, int(pick("latency_count") * scale)),
        latencyWarmup=max(0, pick("latency_warmup")),
        tunnels=pick("tunnels"),
        concurrentBytes=max(1, int(pick("concurrent_kib") * KiB * scale)),
        concurrentReps=pick("concurrent_reps"),
        idleTunnels=max(1, int(pick("idle") * scale)),
        timeLimit=pick("time_limit"),
        outDir=options.out,
        profileDir=options.profile,
        profileNative=options.profile_native,
        profileRate=options.profile_rate,
        install=options.install,
        keep=options.keep,
        quick=options.quick,
        describe=options.describe,
        report=options.report,
        hboneTree=options.hbone_tree.resolve() if options.hbone_tree else None,
    )
