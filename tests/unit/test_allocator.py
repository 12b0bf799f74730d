"""The CPU runtime keeps freed memory for reuse: a step's large temporaries are not page-faulted in anew at
every step. Each case runs in a fresh interpreter, since the allocator's settings last for its process."""

import subprocess
import sys
import textwrap

import pytest

from potential_meme.engine.runtime import keep_freed_memory

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")


def _page_faults_reallocating(keep: bool) -> int:
    """Minor page faults while 10 blocks of 64 MiB (one chunk of logits is 50 MB) are allocated, written
    and freed in turn, after two such blocks have been."""
    script = f"""
        import resource, torch
        from potential_meme.engine.runtime import keep_freed_memory
        if {keep}:
            assert keep_freed_memory()
        for _ in range(2):
            torch.ones(16 * 2**20)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            torch.ones(16 * 2**20)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_without_faulting_their_pages_in_again():
    pages_a_block = 64 * 2**20 // 4096
    assert _page_faults_reallocating(keep=False) > 8 * pages_a_block  # glibc unmaps each block when it is freed
    # Kept, the heap settles within the first few blocks (where, depends on what the process allocated before).
    assert _page_faults_reallocating(keep=True) <= 2 * pages_a_block


def test_the_setting_reports_whether_it_applies():
    assert keep_freed_memory() is True  # glibc here; elsewhere False, and the allocator keeps its own policy
