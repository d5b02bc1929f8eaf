"""The C library's memory allocator, as the jobs use it (glibc on Linux; a no-op elsewhere).

PyTorch on a CPU allocates every large tensor with ``mmap`` and returns it on free, so each
vocabulary-sized tensor faults its pages in afresh. Two ways around that, measured side by side
by ``benchmarks/freed_memory.py``: huge pages (what the workflow's jobs use) and keeping freed
memory (faster on the lens evaluation, but its heap can fragment without bound).
"""

from __future__ import annotations

import ctypes
import os

# glibc's tunable (>= 2.35) that backs malloc's memory with transparent huge pages
HUGE_PAGES = "glibc.malloc.hugetlb"


def huge_page_tunables(current: str | None) -> str:
    """``GLIBC_TUNABLES`` with malloc asking for transparent huge pages, unless it already says.

    Every vocabulary-sized tensor is a fresh ``mmap`` that faults in page by page; with 2 MB
    pages instead of 4 KB the lens evaluation faulted 30x less often, and the heap still returns
    freed memory (``benchmarks/freed_memory.py``). Read by glibc at process start, so the workflow
    sets it for its jobs; ignored by other C libraries and where huge pages are off.
    """
    parts = [part for part in (current or "").split(":") if part]
    if any(part.split("=", 1)[0] == HUGE_PAGES for part in parts):
        return ":".join(parts)
    return ":".join([*parts, f"{HUGE_PAGES}=1"])


def ask_for_huge_pages() -> str:
    """Set :func:`huge_page_tunables` in this process's environment, for the processes it starts
    (the workflow's jobs: glibc reads it at their start); returns the value."""
    os.environ["GLIBC_TUNABLES"] = huge_page_tunables(os.environ.get("GLIBC_TUNABLES"))
    return os.environ["GLIBC_TUNABLES"]


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_MAX
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(enabled: bool = True) -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of returning them to the
    system (``enabled=False`` restores its defaults); returns whether the setting took.

    Not used by the rules: it saves the page faults of every fresh vocabulary-sized tensor, but
    the heap can fragment without bound: measured by ``benchmarks/freed_memory.py`` before the
    lens evaluation computed its KL in place, it peaked at 16-23 GB against 1.2 GB with glibc's
    default (the rules ask for huge pages instead, :func:`huge_page_tunables`). Kept for that
    benchmark. A no-op (False) where the C library has no mallopt (not glibc).
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    trim, mmap_max = (2**31 - 1, 0) if enabled else (128 * 1024, 65536)  # glibc's defaults
    return bool(mallopt(_M_TRIM_THRESHOLD, trim) and mallopt(_M_MMAP_MAX, mmap_max))
