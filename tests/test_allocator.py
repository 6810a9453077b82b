"""utils.allocator: with reuse_freed_memory(), a large block freed and allocated again comes back without page
faults; glibc's defaults map (and fault in) such a block afresh every time. Each case runs in its own process:
the setting is process-wide."""
import subprocess
import sys
import textwrap

import pytest

from train import ROOT

# Allocates, fills and frees a 64 MiB tensor (above glibc's 32 MiB ceiling for its dynamic mmap threshold) eight
# times (the heap grows to its steady size), then prints the median page faults of the next eight allocations.
PROBE = textwrap.dedent("""
    import resource, statistics, sys, torch
    from utils.allocator import reuse_freed_memory
    if sys.argv[1] == "reuse":
        assert reuse_freed_memory()
    def faults_of_fill_and_free():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(64 << 18)  # 64 MiB of float32
        x.fill_(1.0)
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    for _ in range(8):
        faults_of_fill_and_free()
    print(statistics.median(faults_of_fill_and_free() for _ in range(8)))
""")
PAGES = (64 << 20) // 4096  # the 4 KiB pages of one block


def faults_per_allocation(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_a_freed_block_is_reused_without_page_faults():
    assert faults_per_allocation("default") > PAGES / 2  # glibc's defaults: mapped afresh, every page faulted in
    assert faults_per_allocation("reuse") < PAGES / 100
