"""``hbone.limits.tuneMalloc``: the data path's buffers stay in glibc's heap.

Measured as page faults: a process that allocates and frees 256-300 KiB
buffers (what hbone does per socket read) faults in every page of every buffer
with glibc's defaults, and almost none once tuned. Each case runs in its own
interpreter, since malloc settings are per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from hbone.limits import tuneMalloc

_CHURN = textwrap.dedent(
    """
    import resource, sys
    if sys.argv[1] == "tuned":
        from hbone.limits import tuneMalloc
        print(int(tuneMalloc()))
    else:
        print(-1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(1000):
        read = b"r" * 262144        # a socket read
        frame = b"f" * 300000       # a frame built from it
        sealed = b"s" * 262144      # its ciphertext
        del sealed, frame, read
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(tmp_path, mode: str, **env) -> tuple[int, int]:
    """(what tuneMalloc returned or -1, minor page faults over the churn), run as
    a script file like a real program (the heap's layout decides glibc's trims)."""
    script = tmp_path / "churn.py"
    script.write_text(_CHURN)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    environ.update(env)
    out = subprocess.run([sys.executable, str(script), mode], env=environ, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return int(out[0]), int(out[1])


def test_tunedBuffersDoNotFaultEveryPage(tmp_path) -> None:
    changed, tuned = _faults(tmp_path, "tuned")
    _, plain = _faults(tmp_path, "plain")
    assert changed == 1
    # 1000 x 808 KiB: ~200 000 pages to fault in; tuned, the heap keeps them
    assert tuned < 5_000, tuned
    assert plain > 10 * tuned, (
        f"glibc's defaults no longer fault here ({plain} faults vs {tuned} tuned): "
        "is hbone.limits.tuneMalloc still needed?"
    )


def test_operatorsMallocSettingsWin(tmp_path) -> None:
    assert tuneMalloc({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
    assert tuneMalloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}) is False
    # a fixed 128 KiB mmap threshold: every buffer mapped and unmapped, so the
    # page-fault count above does see faults when there are some
    changed, faults = _faults(tmp_path, "tuned", MALLOC_MMAP_THRESHOLD_="131072")
    assert changed == 0
    assert faults > 50_000, faults
