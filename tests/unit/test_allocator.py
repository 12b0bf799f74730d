"""While a CPU trains, freed memory is kept for reuse: a step's large temporaries are not page-faulted in anew
at every step; afterwards the heap's free memory goes back to the system. Each case runs in a fresh
interpreter, since the allocator's settings last for its process."""

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")

PAGES_A_BLOCK = 64 * 2**20 // 4096


def _run(script: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, check=True)
    return [int(value) for value in done.stdout.split()]


def _page_faults_reallocating(device: str) -> int:
    """Minor page faults while 10 blocks of 64 MiB (one chunk of logits is 50 MB) are allocated, written and
    freed in turn, after two such blocks have been, with freed memory kept for `device`."""
    (faults,) = _run(f"""
        import resource, torch
        from potential_meme.engine.runtime import freed_memory_kept
        with freed_memory_kept(torch.device("{device}")):
            for _ in range(2):
                torch.ones(16 * 2**20)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                torch.ones(16 * 2**20)
            print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """)
    return faults


def test_freed_blocks_are_reused_without_faulting_their_pages_in_again():
    # "meta" stands for a GPU: its tensors are not the CPU allocator's, which keeps glibc's own policy
    assert _page_faults_reallocating("meta") > 8 * PAGES_A_BLOCK  # glibc unmaps each block when it is freed
    # Kept, the heap settles within the first few blocks (where, depends on what the process allocated before).
    assert _page_faults_reallocating("cpu") <= 2 * PAGES_A_BLOCK


def test_the_heap_returns_its_free_memory_once_training_is_over():
    inside, after = _run("""
        import torch
        from potential_meme.engine.runtime import freed_memory_kept
        resident = lambda: int(open("/proc/self/statm").read().split()[1])
        with freed_memory_kept(torch.device("cpu")):
            blocks = [torch.ones(16 * 2**20) for _ in range(4)]
            del blocks
            print(resident())
        print(resident())
    """)
    assert inside - after >= 3 * PAGES_A_BLOCK
