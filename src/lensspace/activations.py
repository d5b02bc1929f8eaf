"""The on-disk activation cache: every layer's residual, written once per run.

Layout of a cache folder: ``layer_{i:03d}.safetensors`` for ``i`` in ``0..L`` (``L`` is the
last residual, before the final norm), each holding ``train`` and ``eval`` tensors
[n_sequences, seq_len, d_model]; ``meta.json`` records what produced it and each file's size
and sha256, checked on read (a truncated or damaged file is named, never read). Storage is
fp16 (fp32 where a layer overflows fp16); callers always get fp32.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lensspace.adapter import Adapter, StopForward
from lensspace.devices import move
from lensspace.errors import LensspaceError
from lensspace.sources import sha256_of

FP16_MAX = 65504.0


def layer_file(folder: Path, layer: int) -> Path:
    return Path(folder) / f"layer_{layer:03d}.safetensors"


@torch.no_grad()
def residuals(adapter: Adapter, ids: torch.Tensor) -> list[torch.Tensor]:
    """Residuals ``0..L`` (``L`` before the final norm) of one batch, fp32."""
    store: dict[int, torch.Tensor] = {}
    with adapter.capture_residuals(store, stop=True):
        try:
            adapter.model(ids, use_cache=False)
        except StopForward:
            pass
    return [store[i] for i in range(adapter.n_layers + 1)]


@torch.no_grad()
def write_cache(
    adapter: Adapter,
    tokens: dict[str, torch.Tensor],
    folder: Path,
    meta: dict,
    batch_size: int = 8,
    storage: str = "float16",
) -> dict:
    """Run the model over every split, keep all residuals, write them; return ``meta``.

    The cache is assembled in a sibling ``.partial`` folder and renamed into place, so an
    interrupted run never leaves a cache that looks complete. The forward passes run on the
    adapter's device; the residuals are gathered on the CPU.
    """
    folder = Path(folder)
    n_layers, d = adapter.n_layers, adapter.d_model
    buffers = {
        split: torch.empty(n_layers + 1, *ids.shape, d, dtype=torch.float32)
        for split, ids in tokens.items()
    }
    total = sum(len(ids) for ids in tokens.values())
    started = time.perf_counter()
    with tqdm(total=total, unit="seq", file=sys.stderr, mininterval=5, desc="caching") as bar:
        for split, ids in tokens.items():
            for start in range(0, len(ids), batch_size):
                batch = adapter.to_device(ids[start : start + batch_size].long())
                for layer, h in enumerate(residuals(adapter, batch)):
                    buffers[split][layer, start : start + len(batch)] = h.float().cpu()
                bar.update(len(batch))
    elapsed = time.perf_counter() - started
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    max_abs, files = [], {}
    for layer in range(n_layers + 1):
        peak = max(float(buf[layer].abs().max()) for buf in buffers.values())
        dtype = torch.float16 if storage == "float16" and peak < FP16_MAX else torch.float32
        max_abs.append(peak)
        path = layer_file(partial, layer)
        save_file(
            {split: buf[layer].to(dtype).contiguous() for split, buf in buffers.items()}, str(path)
        )
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    n_tokens = sum(ids.numel() for ids in tokens.values())
    meta = {
        **meta,
        "n_layers": n_layers,
        "d_model": d,
        "storage": storage,
        "files": files,
        "max_abs": max_abs,
        "seconds": elapsed,
        "tokens_per_second": n_tokens / elapsed,
    }
    (partial / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)
    return meta


class ActivationCache:
    """Read access to a cache folder, refusing one made from other tokens than expected.

    Tensors are returned on ``device`` (the adapter's): a layer is read once and moved whole,
    in its storage dtype, and the experiments slice their batches from it there.
    """

    def __init__(
        self,
        folder: str | Path,
        tokens_sha256: str | None = None,
        device: torch.device | str = "cpu",
    ):
        self.folder = Path(folder)
        self.device = torch.device(device)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            raise LensspaceError(
                f"{self.folder} is not an activation cache (no meta.json); "
                "rerun the cache_activations rule"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except ValueError:
            raise LensspaceError(
                f"activation cache file {meta_path} is damaged (not JSON); {self._rebuild_hint()}"
            ) from None
        self._verified: set[str] = set()
        for name, record in self.meta.get("files", {}).items():
            path = self.folder / name
            size = path.stat().st_size if path.exists() else None
            if size != record["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise LensspaceError(
                    f"activation cache file {path} is truncated or damaged ({found}, "
                    f"{record['bytes']} written); {self._rebuild_hint()}"
                )
        if tokens_sha256 is not None and self.meta.get("tokens_sha256") != tokens_sha256:
            raise LensspaceError(
                f"stale activation cache {self.folder}: it was made from other tokens "
                "(tokens_sha256 differs); delete it and rerun"
            )

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    def load(self, layer: int, split: str) -> torch.Tensor:
        """Residual ``layer`` (``n_layers`` = before the final norm) of ``split``, fp32."""
        if not 0 <= layer <= self.n_layers:
            raise LensspaceError(f"layer {layer} is outside 0..{self.n_layers} of {self.folder}")
        path = layer_file(self.folder, layer)
        self._verify(path)
        with safe_open(str(path), framework="pt") as handle:
            return move(handle.get_tensor(split), self.device).float()

    def _verify(self, path: Path) -> None:
        """The file's sha256 against the one written (once per file; caches without records
        pass)."""
        record = self.meta.get("files", {}).get(path.name)
        if record is None or path.name in self._verified:
            return
        if sha256_of(path) != record["sha256"]:
            raise LensspaceError(
                f"activation cache file {path} is damaged (its sha256 differs from the "
                f"one written); {self._rebuild_hint()}"
            )
        self._verified.add(path.name)

    def _rebuild_hint(self) -> str:
        return f"rebuild the cache with `snakemake --forcerun {self.folder}`"

    def final(self, split: str) -> torch.Tensor:
        return self.load(self.n_layers, split)
