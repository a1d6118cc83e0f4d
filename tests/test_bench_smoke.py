"""The benchmark's pure parts: options, statistics, tables, targets, /proc parsing
and profile summaries. The timed run itself is ``make bench``, never a test."""

from __future__ import annotations

import argparse

import pytest

from bench.cli import DEFAULTS, QUICK, parseArgs
from bench.procfs import parseStat, parseStatTimes, parseStatus
from bench.profile import shortFile, summarizeSpeedscope
from bench.report import FIGURES, formatTable, formatValue, ratioTable, summaryTable, targetRows
from bench.stats import KiB, MiB, mbPerSecond, median, percentile, ratio
from bench.systems import SYSTEMS

# -- options ---------------------------------------------------------------------


def test_defaultsCoverTheIssue():
    """Full run: every system and step, >= 256 MiB x 3 each way, >= 1000 setup
    rounds, 100 x 1 MiB concurrent, 1000 idle, under 10 minutes."""
    c = parseArgs([])
    assert c.systems == SYSTEMS == ("raw", "socat", "stunnel", "nghttpx", "hbone")
    assert c.figures == ("latency", "idle", "concurrent", "bulk")
    assert c.bulkBytes >= 256 * MiB and c.bulkReps >= 3
    assert c.latencyCount >= 1000
    assert (c.tunnels, c.concurrentBytes) == (100, 1 * MiB)
    assert c.idleTunnels == 1000
    assert c.timeLimit < 600
    assert not c.quick and c.profileDir is None and c.install


def test_quickIsSmaller():
    c = parseArgs(["--quick"])
    assert c.quick
    assert c.bulkBytes == int(QUICK["bulk_mib"] * MiB) < int(DEFAULTS["bulk_mib"] * MiB)
    assert c.latencyCount == QUICK["latency_count"]
    assert c.timeLimit == QUICK["time_limit"]


def test_explicitCountsOverrideQuickAndScale():
    c = parseArgs(["--quick", "--bulk-mib", "8", "--latency-count", "10", "--scale", "0.5",
                   "--concurrent-kib", "64", "--idle", "20", "--bulk-reps", "2"])
    assert c.bulkBytes == 4 * MiB
    assert c.bulkReps == 2  # repetitions are not scaled
    assert c.latencyCount == 5
    assert c.concurrentBytes == 32 * KiB
    assert c.idleTunnels == 10


def test_systemsAndFiguresSubsets():
    c = parseArgs(["--systems", "hbone,stunnel4,raw,hbone", "--figures", "bulk,latency"])
    assert c.systems == ("raw", "stunnel", "hbone")  # canonical order, aliases, no duplicates
    assert c.figures == ("latency", "bulk")


@pytest.mark.parametrize("argv", [["--systems", "ssh"], ["--figures", "speed"], ["--bulk-mib", "0"],
                                  ["--scale", "-1"], ["--systems", ","]])
def test_badOptionsRefused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parseArgs(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_namesHelper():
    from bench.cli import _names

    with pytest.raises(argparse.ArgumentTypeError, match="unknown system quic"):
        _names("quic", SYSTEMS, "system")


# -- statistics --------------------------------------------------------------------


def test_percentileInterpolates():
    xs = [4, 1, 3, 2]  # unsorted on purpose
    assert percentile(xs, 0) == 1
    assert percentile(xs, 100) == 4
    assert percentile(xs, 50) == 2.5
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([7], 99) == 7
    assert median([3, 1, 2]) == 2


@pytest.mark.parametrize("p", [-1, 101, float("nan")])
def test_percentileRejects(p):
    with pytest.raises(ValueError):
        percentile([1, 2], p)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ratioAndThroughput():
    assert ratio(3, 2) == 1.5
    assert ratio(None, 2) is None and ratio(1, None) is None and ratio(1, 0) is None
    assert mbPerSecond(10_000_000, 2) == 5
    with pytest.raises(ValueError):
        mbPerSecond(1, 0)


# -- tables ------------------------------------------------------------------------


def test_formatValue():
    assert formatValue(None, 2) == "-"
    assert formatValue(1.234, 2) == "1.23"
    assert formatValue(2754.4, 0) == "2,754"
    assert formatValue(1234.5, 2) == "1,234"  # no decimals once large


def test_formatTableAlignsColumns():
    text = formatTable(["system", "MB/s"], [["raw", "2,754"], ["hbone", "9"]])
    lines = text.splitlines()
    assert lines[0] == "| system |  MB/s |"
    assert lines[1] == "| ------ | ----: |"
    assert lines[2] == "| raw    | 2,754 |"
    assert lines[3] == "| hbone  |     9 |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError):
        formatTable(["a", "b"], [["only one"]])


RESULTS = {
    "raw": {"bulk_up": 2000.0, "bulk_down": 3000.0, "setup_p50": 0.1, "setup_p99": 0.3, "concurrent": 1200.0},
    "stunnel": {"bulk_up": 300.0, "bulk_down": 400.0, "setup_p50": 2.0, "setup_p99": 8.0, "concurrent": 160.0,
                "cpu_per_gib": 2.0, "peak_rss": 60.0, "idle_rss": 200.0, "idle_pss": 200.0},
    "hbone": {"bulk_up": 330.0, "bulk_down": 200.0, "setup_p50": 0.5, "setup_p99": 6.0, "concurrent": 160.0,
              "cpu_per_gib": 4.0, "peak_rss": 100.0, "idle_rss": 7.5, "idle_pss": 7.0},
}


def test_summaryAndRatioTables():
    systems = ("raw", "stunnel", "hbone")
    table = summaryTable(RESULTS, systems)
    header = table.splitlines()[0]
    for f in FIGURES:
        assert f.header in header
    assert table.splitlines()[2].startswith("| raw ")
    assert " - " in table.splitlines()[2]  # raw has no CPU or memory figures
    vsRaw = ratioTable(RESULTS, systems, "raw")
    assert "0.15x" in vsRaw.splitlines()[3]  # stunnel up: 300 / 2000
    vsStunnel = ratioTable(RESULTS, systems, "stunnel").splitlines()
    assert vsStunnel[0].startswith("| vs stunnel ")
    hbone = vsStunnel[4]
    assert "1.10x" in hbone and "0.50x" in hbone and "0.25x" in hbone  # up, down, setup p50


def test_targets():
    rows = {r[0]: r for r in targetRows(RESULTS)}
    assert rows["bulk up >= 1.0x stunnel"][4] == "met"
    assert rows["bulk down >= 1.0x stunnel"][4] == "MISSED"
    assert rows["setup p50 <= 1.5 ms and <= 0.3x stunnel"][4] == "met"  # 0.5 ms, 0.25x
    assert rows["setup p99 <= 5 ms"][4] == "MISSED"
    assert rows["CPU per GiB <= 1.0x stunnel"][4] == "MISSED"
    assert rows["100 concurrent tunnels >= 1.0x stunnel"][4] == "met"  # equal counts
    assert rows["idle tunnel, both sides <= 10 KiB"][4] == "met"
    assert rows["bulk up >= 1.0x stunnel"][1:4] == ("330 MB/s", "300 MB/s", "1.10x")
    # without stunnel, relative targets cannot be judged
    alone = {r[0]: r[4] for r in targetRows({"hbone": RESULTS["hbone"]})}
    assert alone["bulk up >= 1.0x stunnel"] == "n/a"
    assert alone["idle tunnel, both sides <= 10 KiB"] == "met"


# -- /proc and profiles ------------------------------------------------------------


def test_parseStatWithAwkwardCommandName():
    fields = ["S", "42"] + ["0"] * 9 + ["150", "50", "7", "3"] + ["0"] * 30
    line = "1234 (we ird) name)) " + " ".join(fields)
    ppid, user, system = parseStatTimes(line)
    assert ppid == 42
    assert (user, system) == pytest.approx((1.57, 0.53))  # (150 + 7, 50 + 3) ticks at 100 Hz
    assert parseStat(line) == (42, pytest.approx(2.10))


def test_parseStatus():
    text = "Name:\tpython\nVmHWM:\t  20480 kB\nVmRSS:\t  10240 kB\nThreads:\t1\n"
    assert parseStatus(text) == {"VmHWM": 20480, "VmRSS": 10240}


def test_summarizeSpeedscope():
    doc = {
        "shared": {"frames": [
            {"name": "run", "file": "/venv/lib/python3.11/site-packages/twisted/internet/base.py"},
            {"name": "dataReceived", "file": "/home/user/src/hbone/hbone/h2/connection.py"},
            {"name": "send", "file": "/venv/lib/python3.11/site-packages/OpenSSL/SSL.py"},
            {"name": "EPollReactor.doPoll", "file": "/venv/lib/python3.11/site-packages/twisted/internet/epollreactor.py"},
        ]},
        "profiles": [
            {"type": "sampled", "samples": [[0, 1], [0, 1, 2], [0, 2], [0, 3]], "weights": [0.004] * 4},
            {"type": "evented", "events": []},
        ],
    }
    s = summarizeSpeedscope(doc, top=2)
    assert s["samples"] == 3
    assert s["idle"] == 1  # waiting in epoll is not work
    assert s["bySelf"][0][0] == "send (OpenSSL/SSL.py)"
    assert s["bySelf"][0][1] == pytest.approx(200 / 3)
    assert s["byTotal"][0] == ("run (twisted/internet/base.py)", pytest.approx(100.0))
    assert summarizeSpeedscope({}) == {"samples": 0, "idle": 0, "bySelf": [], "byTotal": []}


def test_shortFile():
    assert shortFile("/x/lib/python3.11/site-packages/h2/connection.py") == "h2/connection.py"
    assert shortFile("/usr/lib/python3.11/socket.py") == "stdlib/socket.py"
    assert shortFile("/srv/checkout/hbone/splice.py") == "hbone/splice.py"
