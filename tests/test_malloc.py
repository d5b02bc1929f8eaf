"""The allocator setting the workflow gives its jobs (lensspace.malloc)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lensspace.malloc import ask_for_huge_pages, huge_page_tunables

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# Allocate, touch and free a 256 MB tensor four times; report this process's minor page faults.
CHILD = r"""
import json, resource, torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    x = torch.ones(64 * 2**20)
    del x
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def test_tunables_ask_for_huge_pages_and_keep_the_users_own():
    assert huge_page_tunables(None) == "glibc.malloc.hugetlb=1"
    assert huge_page_tunables("") == "glibc.malloc.hugetlb=1"
    assert (
        huge_page_tunables("glibc.malloc.arena_max=2")
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    # a user's own choice of the same tunable wins
    assert (
        huge_page_tunables("glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2")
        == "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2"
    )


def test_the_setting_reaches_child_processes(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert ask_for_huge_pages() == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert child.stdout.strip() == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages available",
)
def test_huge_pages_cut_the_page_faults_of_large_tensors():
    """The point of the setting, measured: a fresh large tensor faults in far fewer pages."""

    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables is not None:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    plain, huge = faults(None), faults(huge_page_tunables(None))
    assert plain >= 4 * 256 * 2**20 // 4096 * 0.9  # every 4 KB page of every tensor, faulted in
    assert huge * 20 < plain, (plain, huge)
