"""Corpus cleaning, tokenization into disjoint splits, and the activation cache on disk."""

import csv
import gzip

import pytest
import torch

from lensspace.activations import ActivationCache, residuals, write_cache
from lensspace.corpus import (TokenSplit, bible_documents, clean, prepare_corpus, read_documents,
                              tokenize_documents)
from lensspace.errors import LensspaceError
from lensspace.models import byte_tokenizer


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


def test_file_corpus_and_tokenized_splits(tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("".join(f"document {i} begins\nand ends {i * i}\n\n" for i in range(40)))
    out = tmp_path / "corpus.txt"
    assert prepare_corpus("t", {"source": "file", "path": str(text)}, out, tmp_path) == 40
    docs = read_documents(out)
    settings = TokenSplit(seq_len=16, train_sequences=20, eval_sequences=6, seed=3)
    tokens = tokenize_documents(docs, byte_tokenizer(), settings)
    assert tokens["train"].shape == (20, 16) and tokens["eval"].shape == (6, 16)
    assert tokens["train"].dtype == torch.int32
    train_rows = {tuple(r.tolist()) for r in tokens["train"]}
    eval_rows = {tuple(r.tolist()) for r in tokens["eval"]}
    assert len(train_rows) == 20 and len(eval_rows) == 6 and not train_rows & eval_rows
    again = tokenize_documents(docs, byte_tokenizer(), settings)
    assert torch.equal(again["train"], tokens["train"])
    other = tokenize_documents(docs, byte_tokenizer(), TokenSplit(16, 20, 6, seed=4))
    assert not torch.equal(other["train"], tokens["train"])
    with pytest.raises(LensspaceError, match="train_sequences"):
        tokenize_documents(docs, byte_tokenizer(), TokenSplit(16, 5000, 6))


def test_missing_corpus_file_names_the_key(tmp_path):
    with pytest.raises(LensspaceError, match="corpora.mine.path"):
        prepare_corpus("mine", {"source": "file", "path": str(tmp_path / "nope.txt")},
                       tmp_path / "o.txt", tmp_path)


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
