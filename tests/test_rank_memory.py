"""A rank's freed blocks go back to the OS (rank_setup.return_freed_blocks_to_os, called by init_rank).

The pattern is a ZeRO-3 step's in miniature: large blocks (gathered parameters, optimizer temporaries) freed
between smaller blocks that stay. With glibc's default, moving mmap threshold the holes stay resident.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from harness.backends.base import free_port
    from harness.backends.rank_setup import init_rank

    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    if sys.argv[1] == "rank":
        init_rank(0, 1, free_port(), "cpu")
    first = torch.ones(4 << 20)
    del first  # one freed 16 MiB block: glibc's default threshold follows it up
    before = resident_mib()
    large, kept = [], []
    for _ in range(32):
        large.append(torch.ones(4 << 20))  # 16 MiB each
        kept.append(torch.ones(60 << 10))  # 240 KiB each, allocated after it, kept
    del large
    print(round(resident_mib() - before))
""")


def _still_resident_mib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_rank_returns_freed_large_blocks_to_the_os():
    # 32 x 16 MiB = 512 MiB freed; the kept blocks are 7.5 MiB
    assert _still_resident_mib("rank") < 64


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_without_it_the_same_pattern_keeps_the_holes_resident():
    """Negative control: the default allocator keeps most of the freed 512 MiB."""
    assert _still_resident_mib("plain") > 256
