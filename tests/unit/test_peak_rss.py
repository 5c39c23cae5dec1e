"""The edge's peak-memory figure is its own, not the peak of the process that started it."""
from __future__ import annotations

import subprocess
import sys

from edge_client.trainer import peak_rss_mb

CHILD = "from edge_client.trainer import peak_rss_mb; print(peak_rss_mb())"


def test_a_child_of_a_large_parent_reports_its_own_peak():
    """getrusage's ru_maxrss survives exec on Linux: a child started by a parent holding 1.5 GB reported
    1.5 GB (bench-growth's edges did, started by a bench holding whole models)."""
    ballast = b"\x01" * (1536 * 2**20)   # touched pages: resident in this process
    parent = peak_rss_mb()
    assert parent > 1536
    own = float(subprocess.check_output([sys.executable, "-c", CHILD], text=True))
    del ballast
    assert 0 < own < parent - 1024, (own, parent)
