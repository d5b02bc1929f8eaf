"""What every workflow script needs: a log file, threads, seeds, a device, atomic outputs.

Scripts are thin: ``runtime.main(snakemake, body)`` runs ``body(snakemake)`` with stderr in
the rule's log, and turns a :class:`LensspaceError` into one clear line and exit status 1.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from lensspace.errors import LensspaceError


def resolve_device(setting: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without one is an error."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise LensspaceError("device: cuda, but no CUDA GPU is visible; use device: auto or cpu")
    return setting


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def write_tsv(
    rows: list[dict] | pd.DataFrame, path: str | Path, float_format: str = "%.6g"
) -> None:
    """Write a TSV with one header line, via a temporary file renamed into place."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    frame.to_csv(partial, sep="\t", index=False, float_format=float_format)
    partial.replace(path)


def write_text(text: str, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


STARTUP_LINE = (
    "[lensspace] start-up:"  # how open_model logs it; provenance.logged_startups reads it
)


def process_seconds() -> float | None:
    """Seconds since this process started (the interpreter's own start-up included), from
    ``/proc``; None where there is no ``/proc`` (not Linux)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def main(snakemake: Any, body: Callable[[Any], None]) -> None:
    """Run one rule's script body with its log, threads and seed set up."""
    log_path = snakemake.log[0] if len(snakemake.log) else None
    console = sys.stderr
    log = open(log_path, "w", buffering=1) if log_path else sys.stderr
    sys.stderr = log
    sys.stdout = log
    try:
        torch.set_num_threads(max(1, int(snakemake.threads)))
        # a rule's seed is a param (so the rerun trigger sees it); the global one is a safety net
        seed_everything(int(snakemake.params.get("seed", 0)))
        print(
            f"[lensspace] rule {snakemake.rule} on {platform.node()} pid {os.getpid()}, "
            f"{torch.get_num_threads()} threads, "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}",
            file=log,
        )
        body(snakemake)
    except LensspaceError as err:
        message = f"lensspace error in rule {snakemake.rule}: {err}"
        print(message, file=log)
        print(message, file=console)
        sys.exit(1)
    except Exception:
        traceback.print_exc(file=log)
        print(f"rule {snakemake.rule} failed; traceback in {log_path}", file=console)
        sys.exit(1)
    finally:
        log.flush()


def open_model(manifest: str | Path, device_setting: str = "cpu", compute: dict | None = None):
    """The prepared model whose manifest is ``manifest``: (adapter, tokenizer).

    ``compute`` (the ``compute`` settings as a dict) sets the fp32 policy before any work;
    the device, GPU and policy go into the rule's log.
    """
    from lensspace import fused, gemm
    from lensspace.adapter import Adapter
    from lensspace.devices import configure_numerics, describe
    from lensspace.models import load_model

    configure_numerics(bool((compute or {}).get("allow_tf32", False)))
    fused.enable(bool((compute or {}).get("fused_cpu", True)))
    gemm.enable(bool((compute or {}).get("onednn_cpu", True)))
    model, tokenizer = load_model(Path(manifest).parent, resolve_device(device_setting))
    adapter = Adapter(gemm.route_linears(model))
    startup = process_seconds()
    if startup is not None:
        print(
            f"{STARTUP_LINE} {startup:.2f} s from the process's start to the model loaded "
            "(interpreter, imports, model load)",
            file=sys.stderr,
        )
    print(
        f"[lensspace] compute: {describe(adapter.device)}; fused CPU kernel "
        f"{'on' if fused.change_sums.enabled else 'off'}; CPU float32 products by "
        f"{'oneDNN' if gemm.active() else 'torch default'}",
        file=sys.stderr,
    )
    return adapter, tokenizer


def compute_settings(compute: dict | None):
    """The rule's ``compute`` param (plain values) as
    :class:`~lensspace.devices.ComputeSettings`."""
    from lensspace.devices import ComputeSettings

    return ComputeSettings(**(compute or {}))


def open_cache(folder: str | Path, tokens: str | Path, device: torch.device | str = "cpu"):
    """The activation cache, checked against the tokens file it must have been made from;
    its tensors are returned on ``device``."""
    from lensspace.activations import ActivationCache
    from lensspace.sources import sha256_of

    return ActivationCache(folder, tokens_sha256=sha256_of(Path(tokens)), device=device)
