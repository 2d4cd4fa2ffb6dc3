"""Handing freed memory back to the OS between hierarchical groups (glibc's malloc_trim)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from supermerge_hf.functional import _malloc_trim

# Run in a fresh process whose glibc keeps every freed block (all allocations from the heap, no automatic trim),
# the state a long merge reaches once glibc's mmap threshold has grown past the weight tensors' size.
SCRIPT = """
import json, os, torch
from supermerge_hf.functional import release_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

keep, large = [], []
for _ in range(256):
    large.append(torch.ones(2**18))  # 1 MB each
    keep.append(torch.ones(64))  # live blocks between the large ones
full = rss_mb()
del large
held = rss_mb()
release_memory()
print(json.dumps({"full": full, "held": held, "released": rss_mb()}))
"""


@pytest.mark.skipif(_malloc_trim() is None, reason="glibc only: other allocators have no malloc_trim")
def test_release_memory_returns_freed_heap_memory():
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**26), MALLOC_TRIM_THRESHOLD_=str(2**40))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert rss["held"] > rss["full"] - 32, rss  # freed, but still held by the allocator
    assert rss["released"] < rss["held"] - 224, rss  # handed back: 256 MB were freed
