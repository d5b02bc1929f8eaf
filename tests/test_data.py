"""Corpus cleaning, tokenization into splits disjoint by document, and the activation cache on
disk."""

import csv
import gzip
from pathlib import Path

import pytest
import torch

from lensspace.activations import ActivationCache, residuals, write_cache
from lensspace.corpus import (
    TokenSplit,
    bible_documents,
    clean,
    prepare_corpus,
    read_documents,
    split_documents,
    tokenize_documents,
)
from lensspace.errors import LensspaceError
from lensspace.models import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_CORPUS = ROOT / "tests" / "data" / "tiny_corpus.txt"


def test_clean_drops_footnotes_and_spaces():
    assert clean("In the {Or, At the} beginning\n  God  ") == "In the beginning God"


def test_bible_table_to_chapter_documents(tmp_path):
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["field"] * 5)  # the placeholder header of the real file
        writer.writerow(["01001001", "1", "1", "1", "In the beginning{note} God"])
        writer.writerow(["01001002", "1", "1", "2", "created."])
        writer.writerow(["01002001", "1", "2", "1", "Next chapter."])
    assert bible_documents(path) == ["In the beginning God created.", "Next chapter."]


def _rebuilt(docs, tokenizer, indices):
    """Each listed document tokenized on its own, end-of-text after it: the split's stream,
    and where each document starts and ends in it."""
    stream, spans = [], []
    for index in indices:
        ids = tokenizer(docs[index], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        spans.append((index, len(stream), len(stream) + len(ids)))
        stream.extend(ids)
    return stream, spans


def _check_split_by_document(docs, tokenizer, settings):
    """The recorded split is disjoint by document, minimal, and reproduces every sequence."""
    result = split_documents(docs, tokenizer, settings)
    assert not set(result.documents["train"]) & set(result.documents["eval"])
    length = settings.seq_len
    n = settings.train_sequences
    tokens = result.tokens["train"]
    assert tokens.dtype == torch.int32 and tokens.shape == (n, length)
    stream, spans = _rebuilt(docs, tokenizer, result.documents["train"])
    assert tokens.flatten().tolist() == stream[: n * length]
    assert spans[-1][1] < n * length  # no document more than needed
    for row, recorded in enumerate(result.sequence_documents["train"]):
        assert recorded == [
            d for d, start, end in spans if start < (row + 1) * length and end > row * length
        ]
    # eval: one sequence per document, its first seq_len tokens: every sequence another document
    evaluated = result.tokens["eval"]
    assert evaluated.dtype == torch.int32 and evaluated.shape == (settings.eval_sequences, length)
    assert len(set(result.documents["eval"])) == settings.eval_sequences
    for row, doc in zip(evaluated, result.documents["eval"]):
        assert row.tolist() == tokenizer(docs[doc], add_special_tokens=False)["input_ids"][:length]
    assert result.sequence_documents["eval"] == [[doc] for doc in result.documents["eval"]]
    return result


def test_tiny_corpus_split_by_document(tmp_path):
    out = tmp_path / "corpus.txt"
    prepare_corpus("t", {"source": "file", "path": str(TINY_CORPUS)}, out, tmp_path)
    docs, tok = read_documents(out), byte_tokenizer()
    settings = TokenSplit(seq_len=32, train_sequences=24, eval_sequences=8, seed=0)
    result = _check_split_by_document(docs, tok, settings)
    again = split_documents(docs, tok, settings)
    assert again.documents == result.documents
    assert all(torch.equal(again.tokens[k], result.tokens[k]) for k in ("train", "eval"))
    other = _check_split_by_document(docs, tok, TokenSplit(32, 24, 8, seed=1))
    assert other.documents != result.documents
    with pytest.raises(LensspaceError, match="eval_sequences"):
        split_documents(docs, tok, TokenSplit(32, 24, 5000))
    assert torch.equal(tokenize_documents(docs, tok, settings)["eval"], result.tokens["eval"])


def _documents_containing(row, doc_strings, eos):
    """Documents whose tokens contain a piece (16+ tokens, between end-of-text) of ``row``."""
    pieces, current = [], []
    for token in row.tolist() + [eos]:
        if token == eos:
            pieces.append(current)
            current = []
        else:
            current.append(token)
    found = set()
    for piece in pieces:
        if len(piece) >= 16:
            text = "".join(map(chr, piece))
            found |= {i for i, doc in doc_strings.items() if text in doc}
    assert found, "every sequence is found in some document"
    return found


def test_real_bible_split_by_chapter(real):
    """The real fixture's tokens (24 train / 6 eval sequences of 128 on the WEB bible): every
    sequence is located among the chapters by searching its tokens, and no chapter is found in
    both splits; the recorded assignment says the same, and another seed splits differently."""
    docs = read_documents(ROOT / "resources" / "corpora" / "web-bible.txt")
    tok = real.tokenizer
    settings = TokenSplit(seq_len=128, train_sequences=24, eval_sequences=6, seed=0)
    result = _check_split_by_document(docs, tok, settings)
    doc_strings = {
        i: "".join(map(chr, tok(d, add_special_tokens=False)["input_ids"]))
        for i, d in enumerate(docs)
    }
    located = {
        split: set().union(
            *(
                _documents_containing(row, doc_strings, tok.eos_token_id)
                for row in real.tokens[split]
            )
        )
        for split in ("train", "eval")
    }
    assert not located["train"] & located["eval"]
    assert located == {k: set(v) for k, v in result.documents.items()}
    other = _check_split_by_document(docs, tok, TokenSplit(128, 24, 6, seed=1))
    assert other.documents != result.documents
    with pytest.raises(LensspaceError, match="train_sequences"):
        split_documents(docs[:3], tok, settings)


def test_missing_corpus_file_names_the_key(tmp_path):
    with pytest.raises(LensspaceError, match="corpora.mine.path"):
        prepare_corpus(
            "mine",
            {"source": "file", "path": str(tmp_path / "nope.txt")},
            tmp_path / "o.txt",
            tmp_path,
        )


def test_cache_roundtrip_and_staleness(tiny, tiny_ids, tmp_path):
    adapter, _ = tiny
    tokens = {"train": tiny_ids[:3].int(), "eval": tiny_ids[3:].int()}
    meta = write_cache(adapter, tokens, tmp_path / "cache", {"tokens_sha256": "abc"}, batch_size=2)
    assert meta["n_layers"] == adapter.n_layers
    cache = ActivationCache(tmp_path / "cache", tokens_sha256="abc")
    expected = residuals(adapter, tiny_ids[:3].long())
    for layer in range(adapter.n_layers + 1):
        got = cache.load(layer, "train")
        assert got.dtype == torch.float32 and got.shape == (3, 12, adapter.d_model)
        torch.testing.assert_close(got, expected[layer], atol=2e-3, rtol=2e-3)  # fp16 storage
    with pytest.raises(LensspaceError, match="stale"):
        ActivationCache(tmp_path / "cache", tokens_sha256="other")
    with pytest.raises(LensspaceError, match="outside"):
        cache.load(adapter.n_layers + 1, "eval")
    assert not (tmp_path / "cache.partial").exists()


def test_cache_keeps_fp32_where_fp16_would_overflow(tiny, tiny_ids, tmp_path):
    adapter, _ = tiny
    original = adapter.embed.weight.clone()
    try:
        with torch.no_grad():
            adapter.embed.weight.mul_(1e7)
        meta = write_cache(adapter, {"train": tiny_ids.int()}, tmp_path / "c", {})
        assert meta["max_abs"][0] > 65504
        layer0 = ActivationCache(tmp_path / "c").load(0, "train")
        assert torch.isfinite(layer0).all()
    finally:
        with torch.no_grad():
            adapter.embed.weight.copy_(original)


def test_gguf_parsed_once_loads_the_same_model(real):
    """The GGUF file parsed once for the tokenizer, config and weights (and each tensor-name map
    built once) gives the same weights and vocabulary as transformers' own repeated parsing; the
    ``gguf`` package is itself again after the block."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lensspace.models import gguf_parsed_once

    path = (
        real.model_folder.parents[1]
        / "downloads"
        / "smollm2-135m"
        / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    originals = gguf.GGUFReader, gguf.get_tensor_name_map

    def load():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        return tokenizer, model.state_dict()

    with gguf_parsed_once():
        assert gguf.GGUFReader(path) is gguf.GGUFReader(str(path))
        once_tokenizer, once = load()
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals
    tokenizer, weights = load()
    assert once_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert once.keys() == weights.keys()
    assert all(torch.equal(once[name], weights[name]) for name in weights)
