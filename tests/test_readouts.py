"""Readouts in place of the unembedding: each operation against an independent computation.

Tiny random models check the operations on every family; the real default model checks them
where the effect lives (an attention sink, a real tokenizer's token sets, real probes): a masked
readout over every token is the unembedding, a back half at m = L has W_U's labels, a probe on
shuffled labels is at chance, and the back half's Jacobian matches finite differences.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import ROOT

from lensspace.errors import LensspaceError
from lensspace.experiments import readouts as ro
from lensspace.experiments.grid import AblationGrid, Cell, CellResults
from lensspace.subspaces import ablate, unembedding_bases


def projector(q: torch.Tensor) -> torch.Tensor:
    q = q.double()
    return q @ q.T


def gap_to_unembedding(adapter, basis) -> float:
    """Spectral norm of the difference between the projectors onto a basis's output subspace
    (top d/2) and ``unembed_centered``'s: 0 when they are the same subspace."""
    reference = unembedding_bases(adapter)["unembed_centered"]
    k = adapter.d_model // 2
    gap = projector(basis.vectors[:, :k]) - projector(reference.vectors[:, :k])
    return float(torch.linalg.matrix_norm(gap, 2))


# ----------------------------------------------------------------------------- token sets


@pytest.mark.parametrize(
    "rule, inside, outside",
    [
        ("digits", ["7", " 12", "0"], ["a1", "", " ", "½"]),
        ("python", ["def", " if", "==", " match", "->"], ["define", "If", " x"]),
        ("japanese", ["です", " 神", "カタカナ"], ["abc", "神a", "\ufffd"]),
        ("capitalised", ["The", " Jesus", "I"], ["the", "THE", "Ab1"]),
    ],
)
def test_token_set_rules(rule, inside, outside):
    assert all(ro._in_set(t, rule) for t in inside)
    assert not any(ro._in_set(t, rule) for t in outside)


def test_unknown_token_set_is_refused():
    with pytest.raises(LensspaceError, match="unknown token set 'emoji'"):
        ro._in_set("x", "emoji")


def test_next_token_labels_look_one_ahead():
    tokens = torch.tensor([[5, 1, 2, 1, 9]])
    labels, positions = ro.next_token_labels(tokens, torch.tensor([1]))
    assert positions.tolist() == [1, 2, 3]  # position 0 excluded; the last has no next token
    assert labels.tolist() == [[0, 1, 0]]  # token at 2 is 2, at 3 is 1, at 4 is 9


# ----------------------------------------------------------------------------- readouts, tiny


def test_masked_readout_over_every_token_is_the_head(tiny):
    adapter, _ = tiny
    vocab = adapter.unembedding.shape[0]
    readout = ro.MaskedReadout(adapter, "all", torch.arange(vocab))
    x = torch.randn(2, 5, adapter.d_model, generator=torch.Generator().manual_seed(0))
    got = readout.logits(x).double().log_softmax(-1)
    want = adapter.logits(x).double().log_softmax(-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    basis = ro.labels(readout)
    reference = unembedding_bases(adapter)["unembed_centered"]
    d = adapter.d_model
    torch.testing.assert_close(basis.singular_values[: d - 1], reference.singular_values[: d - 1])
    k = d // 2
    torch.testing.assert_close(
        projector(basis.vectors[:, :k]), projector(reference.vectors[:, :k]), atol=1e-4, rtol=0
    )


def test_masked_readout_renormalises_over_its_set(tiny):
    adapter, _ = tiny
    ids = torch.tensor([3, 17, 40, 41])
    readout = ro.MaskedReadout(adapter, "some", ids)
    x = torch.randn(1, 4, adapter.d_model, generator=torch.Generator().manual_seed(1))
    full = adapter.logits(x).double().softmax(-1)[..., ids]
    torch.testing.assert_close(
        readout.logits(x).double().softmax(-1),
        full / full.sum(-1, keepdim=True),
        atol=1e-6,
        rtol=1e-5,
    )


def test_back_half_at_the_last_layer_has_the_unembeddings_labels(tiny):
    adapter, _ = tiny
    readout = ro.BackHalfReadout(adapter, "end", adapter.n_layers, None)
    h = torch.randn(2, 6, adapter.d_model, generator=torch.Generator().manual_seed(2)) * 3
    readout.jacobian = ro.back_half_jacobian(readout, h)
    scale = adapter.norm_scale(adapter.centre(h))[:, 1:]  # frozen at the unshifted state
    eye = torch.eye(adapter.d_model, dtype=torch.float64)
    torch.testing.assert_close(
        readout.jacobian, eye * float((1 / scale.double()).mean()), atol=1e-6, rtol=1e-5
    )
    reference = unembedding_bases(adapter)["unembed_centered"]
    basis = ro.labels(readout)
    k = adapter.d_model // 2
    torch.testing.assert_close(
        projector(basis.vectors[:, :k]), projector(reference.vectors[:, :k]), atol=1e-4, rtol=0
    )


def finite_difference_jacobian(readout, h: torch.Tensor, eps: float) -> torch.Tensor:
    """Column j: the central difference of mean_t (h_L[t] / s_t) for a shift of h_m along e_j at
    every position >= 1 (s_t frozen at the unshifted state)."""
    adapter = readout.adapter
    with torch.no_grad():
        scale = adapter.norm_scale(adapter.centre(readout.final_residual(h)))[:, 1:]
        cols = []
        for j in range(h.shape[-1]):
            out = []
            for sign in (1, -1):
                x = h.clone()
                x[:, 1:, j] += sign * eps
                final = readout.final_residual(x)[:, 1:] / scale
                out.append(final.mean((0, 1)))
            cols.append((out[0] - out[1]) / (2 * eps))
    return torch.stack(cols, 1)


def test_back_half_jacobian_against_finite_differences(tiny):
    adapter, _ = tiny
    model = adapter.model
    model.double()
    try:
        readout = ro.BackHalfReadout(adapter, "back", 1, None)
        h = torch.randn(2, 7, adapter.d_model, generator=torch.Generator().manual_seed(3)).double()
        got = ro.back_half_jacobian(readout, h, rows_per_pass=5)
        # the families' RMSNorms compute in float32 even in a float64 model: a step of 1e-2
        # balances that rounding against the truncation error; OPT's ReLUs need a small step
        eps = 1e-2 if adapter.norm_kind == "rmsnorm" else 1e-5
        want = finite_difference_jacobian(readout, h, eps)
        torch.testing.assert_close(got, want.double(), atol=1e-4, rtol=1e-3)
    finally:
        model.float()


def test_cells_ablate_the_readouts_own_subspaces(tiny):
    """KL of each cell equals KL(readout(z) || readout(ablate(z))) computed here in float64, with
    position 0 left as it is."""
    adapter, _ = tiny
    readout = ro.MaskedReadout(adapter, "some", torch.arange(0, 200, 3))
    basis = ro.labels(readout)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(3, 6, adapter.d_model, generator=gen) * 2
    mean = torch.randn(adapter.d_model, generator=gen)
    grid = AblationGrid(ks=(4,), bases=(basis.name,), sites=("pre_norm",), random_draws=2)
    results = ro.cell_results(readout, basis, z, mean, 1, grid, chunk=2)
    for cell in results.kl:
        if cell.subspace == "random":
            continue
        rank = ro.label_rank(basis)
        q = basis.vectors[:, :4] if cell.subspace == "output" else basis.vectors[:, rank - 4 : rank]
        edited = torch.cat([z[:, :1], ablate(z[:, 1:], q, cell.mode, mean)], 1)
        p = readout.logits(z).double().log_softmax(-1)[:, 1:]
        r = readout.logits(edited).double().log_softmax(-1)[:, 1:]
        want = (p.exp() * (p - r)).sum(-1)
        torch.testing.assert_close(torch.cat(results.kl[cell]), want, atol=2e-5, rtol=1e-3)


def corpus_of(adapter, name: str, seed: int, n: int = 12, length: int = 10) -> ro.Corpus:
    """A corpus of random tokens with every residual of the model, train and eval splits."""
    from lensspace.activations import residuals

    gen = torch.Generator().manual_seed(seed)
    tokens = {
        split: torch.randint(0, 256, (n, length), generator=gen) for split in ("train", "eval")
    }
    stored = {split: residuals(adapter, ids) for split, ids in tokens.items()}
    return ro.Corpus(name, lambda layer, split: stored[split][layer], tokens)


def test_fidelity_rows_against_a_direct_kl(tiny):
    adapter, _ = tiny
    corpus = corpus_of(adapter, "c", 10)
    readout = ro.MaskedReadout(adapter, "some", torch.arange(0, 120, 2))
    source = corpus.residual(adapter.n_layers, "eval")
    h = corpus.residual(1, "eval")
    tuned = torch.cat([source[:, :1], h[:, 1:] * 1.5], 1)
    views = ro.Views({1: {"tuned": tuned}}, source, source)
    rows = {r["view"]: r for r in ro.fidelity_rows(readout, views, "c", 100, 0, chunk=5)}
    p = readout.logits(source).double().log_softmax(-1)[:, 1:]
    q = readout.logits(tuned).double().log_softmax(-1)[:, 1:]
    want = float((p.exp() * (p - q)).sum(-1).mean())
    assert rows["tuned"]["kl"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert rows["tuned"]["kl_lo"] <= rows["tuned"]["kl"] <= rows["tuned"]["kl_hi"]
    assert rows["model"]["kl"] == pytest.approx(0.0, abs=1e-6)
    full = adapter.logits(tuned[:, 1:]).double().softmax(-1)
    assert rows["tuned"]["set_mass"] == pytest.approx(float(full[..., readout.ids].sum(-1).mean()))


def test_a_back_halfs_model_row_is_the_models_own_output(tiny):
    """The back half read from the model's own h_m reproduces its output: KL about 0."""
    adapter, _ = tiny
    corpus = corpus_of(adapter, "c", 11)
    readout = ro.BackHalfReadout(adapter, "back", 1, torch.eye(adapter.d_model))
    source = corpus.residual(1, "eval")
    views = ro.Views({}, source, corpus.residual(adapter.n_layers, "eval"))
    (row,) = ro.fidelity_rows(readout, views, "c", 100, 0, chunk=4)
    assert row["view"] == "model" and row["kl"] == pytest.approx(0.0, abs=1e-5)


def test_a_corpus_probe_between_two_samples_of_one_distribution_is_at_chance(tiny):
    """Two 'corpora' of the same random tokens: nothing tells them apart, so the probe built
    and scored by the experiment is at chance on held-out tokens."""
    adapter, _ = tiny
    corpora = [corpus_of(adapter, "a", 12, n=30), corpus_of(adapter, "b", 13, n=30)]
    spec = ro.ReadoutSpec("corpus", "probe", target="corpus")
    settings = ro.ReadoutSettings([0], AblationGrid(), probe_l2=1e-2)
    _, facts, per = ro.build_readout(adapter, None, spec, corpora, settings)
    n = facts["n_heldout"]
    assert abs(facts["heldout_balanced_accuracy"] - 0.5) < 3 * math.sqrt(0.25 / n)
    assert set(per) == {"a", "b"} and (per["b"][0] == 1).all()


# ----------------------------------------------------------------- labels and statistics


def test_principal_angles_of_known_subspaces():
    eye = torch.eye(6)
    assert ro.principal_angles(eye[:, :2], eye[:, :3]).tolist() == [1.0, 1.0]
    assert ro.principal_angles(eye[:, :2], eye[:, 2:4]).abs().max() < 1e-12
    tilt = torch.tensor([[math.cos(0.3)], [math.sin(0.3)], [0.0], [0.0], [0.0], [0.0]])
    assert float(ro.principal_angles(tilt, eye[:, :1])[0]) == pytest.approx(math.cos(0.3))


def test_a_random_subspace_overlaps_half_of_the_reference():
    """The control's mean squared cosine is the reference's share of the space, (d/2)/d."""
    d = 40
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(5)))
    reference = ro.Basis("w", q, torch.linspace(2, 1, d))
    basis = ro.Basis("r", torch.linalg.qr(torch.randn(d, d))[0], torch.linspace(2, 1, d))
    row = ro.angle_row(basis, reference, 10, seed=0, draws=64)
    assert row["random_mean_cos2"] == pytest.approx(0.5, abs=0.02)
    same = ro.angle_row(reference, reference, 10, seed=0)
    assert same["mean_cos2"] == pytest.approx(1.0) and same["smallest_angle_deg"] < 1e-3


def test_a_probes_subspace_size_is_its_rank():
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(6))

    class Fixed(ro.Readout):
        name = "probe"

        def matrix(self):
            return (w - w.mean(0)).double()

    basis = ro.labels(Fixed())
    assert ro.label_rank(basis) == 2 and ro.subspace_size(basis) == 1
    grid = AblationGrid(random_draws=1)
    internal = ro.readout_subspace(basis, 2, grid, 0, "internal", 1, 0)
    output = ro.readout_subspace(basis, 2, grid, 0, "output", 1, 0)
    # both lie in the probe's row space (its null space would be internal by construction)
    row_space = projector(torch.linalg.qr((w - w.mean(0)).T.double())[0])
    for q in (internal, output):
        torch.testing.assert_close(row_space @ q.double(), q.double(), atol=1e-6, rtol=0)
    assert ro.readout_subspaces(1) == ("output",)
    # the random control is drawn inside the row space too
    random = ro.readout_subspace(basis, 2, grid, 0, "random", 1, 0)
    torch.testing.assert_close(row_space @ random.double(), random.double(), atol=1e-6, rtol=0)


def test_probe_recovers_a_separable_rule_and_its_direction():
    gen = torch.Generator().manual_seed(7)
    u = torch.randn(2000, 12, generator=gen)
    direction = torch.zeros(12)
    direction[3] = 1.0
    y = (u @ direction > 0).long()
    w, b = ro.fit_probe(ro.ProbeData(u, y), 2, l2=1e-4, iterations=200)
    scores = ro.classification_scores(u @ w.T + b, y)
    assert scores["accuracy"] > 0.97
    centred = (w[1] - w[0]) / (w[1] - w[0]).norm()
    assert abs(float(centred[3])) > 0.95


def test_calibration_error_of_constructed_predictions():
    """All predictions 0.8 for class 0: ECE 0 when 80% are class 0, 0.2 when 60% are."""
    logits = torch.tensor([[math.log(0.8), math.log(0.2)]]).repeat(10, 1)
    calibrated = torch.tensor([0] * 8 + [1] * 2)
    off = torch.tensor([0] * 6 + [1] * 4)
    assert ro.classification_scores(logits, calibrated)["ece"] == pytest.approx(0.0, abs=1e-6)
    assert ro.classification_scores(logits, off)["ece"] == pytest.approx(0.2)
    assert ro.classification_scores(logits, off)["balanced_accuracy"] == pytest.approx(0.5)


def constructed(output: float, internal: float, n: int = 24) -> CellResults:
    gen = torch.Generator().manual_seed(8)
    grid = AblationGrid(ks=(4,), bases=("b",), modes=("zero",), sites=("pre_norm",), random_draws=2)
    res = CellResults(3, grid)
    noise = lambda: torch.rand(n, 5, generator=gen) * 0.1  # noqa: E731
    res.add(Cell("output", 4, "b", "zero", "pre_norm"), output + noise(), torch.zeros(n, 5))
    res.add(Cell("internal", 4, "b", "zero", "pre_norm"), internal + noise(), torch.zeros(n, 5))
    for draw in range(2):
        res.add(
            Cell("random", 4, "random", "zero", "pre_norm", draw), 0.5 + noise(), torch.zeros(n, 5)
        )
    return res


def test_verdicts_follow_the_direction_of_the_difference():
    holds = ro.verdict_rows([constructed(2.0, 1.0)], "r", 500, 0)
    swapped = ro.verdict_rows([constructed(1.0, 2.0)], "r", 500, 0)
    first = {r["comparison"]: r for r in holds}
    assert first["output - internal"]["verdict"] == "holds"
    assert first["output - internal"]["diff"] == pytest.approx(1.0, abs=0.05)
    assert (
        first["output - internal"]["lo"]
        < first["output - internal"]["diff"]
        < first["output - internal"]["hi"]
    )
    assert {r["comparison"]: r for r in swapped}["output - internal"]["verdict"] == "reversed"
    assert all(r["p_adjusted"] >= r["p_value"] for r in holds + swapped)


# ----------------------------------------------------------------------------- config


def validated(edit) -> dict:
    import yaml

    from lensspace.configfile import validate_config

    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    edit(config)
    validate_config(config, str(ROOT / "schemas" / "config.schema.yaml"))
    return config


def test_refusals_name_the_key():
    from lensspace.validation import check_references

    def undefined(c):
        c["runs"]["tiny-gpt2"]["readouts"] = ["nope"]

    with pytest.raises(LensspaceError, match=r"runs.tiny-gpt2.readouts: 'nope' is not defined"):
        check_references(validated(undefined))

    def beyond(c):
        c["readouts"]["define"]["back-half"]["layer"] = 9

    with pytest.raises(LensspaceError, match=r"readouts.define.back-half.layer: 9 is beyond"):
        check_references(validated(beyond))

    def no_corpora(c):
        c["runs"]["tiny-gpt2"]["readouts"] = ["corpus"]

    with pytest.raises(LensspaceError, match="needs the run's eval_corpora"):
        check_references(validated(no_corpora))

    def masked_without_tokens(c):
        c["readouts"]["define"]["python"] = {"kind": "masked"}

    with pytest.raises(LensspaceError, match="tokens"):
        validated(masked_without_tokens)


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_parts(real):
    adapter = real.adapter
    return adapter, real.cache


def test_real_masked_readout_over_every_token_is_the_unembedding(real_parts, real):
    adapter, cache = real_parts
    vocab = adapter.unembedding.shape[0]
    readout = ro.MaskedReadout(adapter, "all", ro.token_set(real.tokenizer, vocab, "all"))
    h = cache.final("eval")[:2]
    got = readout.logits(h).double().log_softmax(-1)
    want = adapter.logits(h).double().log_softmax(-1)
    assert float((got - want).abs().max()) < 1e-3
    assert gap_to_unembedding(adapter, ro.labels(readout)) < 1e-3


def test_real_token_sets_name_what_they_say(real):
    tok = real.tokenizer
    vocab = real.adapter.unembedding.shape[0]
    digits = ro.token_set(tok, vocab, "digits")
    assert sorted(tok.decode([int(i)]).strip() for i in digits)[:10] == list("0123456789")
    capital = ro.token_set(tok, vocab, "capitalised")
    assert tok.encode(" Jesus", add_special_tokens=False)[0] in set(capital.tolist())
    python = set(ro.token_set(tok, vocab, "python").tolist())
    assert tok.encode("def", add_special_tokens=False)[0] in python


def test_real_back_half_at_the_last_layer_has_the_unembeddings_labels(real_parts):
    adapter, cache = real_parts
    readout = ro.BackHalfReadout(adapter, "end", adapter.n_layers, None)
    readout.jacobian = ro.back_half_jacobian(readout, cache.final("train")[:1])
    assert gap_to_unembedding(adapter, ro.labels(readout)) < 1e-3


def test_real_back_half_jacobian_against_finite_differences(real_parts):
    """The last block of SmolLM2 on one real sequence (its attention sink at position 0
    included): the Jacobian by reverse mode against central differences, and their SVDs."""
    adapter, cache = real_parts
    m = adapter.n_layers - 1
    readout = ro.BackHalfReadout(adapter, "last", m, None)
    h = cache.load(m, "train")[:1, :24]
    got = ro.back_half_jacobian(readout, h, rows_per_pass=64)
    want = finite_difference_jacobian(readout, h, eps=0.05 * float(h[:, 1:].pow(2).mean().sqrt()))
    rel = float(torch.linalg.matrix_norm(got - want.double()) / torch.linalg.matrix_norm(got))
    assert rel < 1e-2
    s_got, s_want = torch.linalg.svdvals(got), torch.linalg.svdvals(want.double())
    torch.testing.assert_close(s_got[:20], s_want[:20], rtol=2e-2, atol=0)
    k = 20
    top_got = torch.linalg.svd(got)[2][:k].T
    top_want = torch.linalg.svd(want.double())[2][:k].T
    assert float(ro.principal_angles(top_got, top_want).pow(2).mean()) > 0.99


def test_real_probe_on_shuffled_labels_is_at_chance(real_parts):
    """Which half of the corpus a token's sequence comes from is learnable from nothing; with
    the labels shuffled across tokens, the held-out accuracy is the majority share."""
    adapter, cache = real_parts
    train, test = cache.final("train")[:, 1:], cache.final("eval")[:, 1:]
    u_train = adapter.normalize(train).reshape(-1, adapter.d_model)
    u_test = adapter.normalize(test).reshape(-1, adapter.d_model)
    gen = torch.Generator().manual_seed(9)
    y_train = torch.randint(0, 2, (len(u_train),), generator=gen)
    y_test = torch.randint(0, 2, (len(u_test),), generator=gen)
    w, b = ro.fit_probe(ro.ProbeData(u_train, y_train), 2, l2=1e-4, iterations=100)
    scores = ro.classification_scores(u_test @ w.T + b, y_test)
    n = len(y_test)
    assert abs(scores["balanced_accuracy"] - 0.5) < 3 * math.sqrt(0.25 / n)
    assert scores["accuracy"] < scores["majority_share"] + 3 * math.sqrt(0.25 / n)


# ----------------------------------------------------------------------------- the workflow


def test_workflow_readouts_tsvs(tiny_run):
    workdir, config = tiny_run
    run = "tiny-llama"
    names = config["runs"][run]["readouts"]
    folder = workdir / "results" / run / "readouts"
    for name in names:
        summary = pd.read_csv(folder / name / "summary.tsv", sep="\t").iloc[0]
        fidelity = pd.read_csv(folder / name / "fidelity.tsv", sep="\t")
        ablation = pd.read_csv(folder / name / "ablation.tsv", sep="\t")
        verdicts = pd.read_csv(folder / name / "verdicts.tsv", sep="\t")
        assert (fidelity["kl"] >= -1e-6).all() and (ablation["kl"] >= -1e-6).all()
        corpora = {"tiny-text"} if summary["kind"] == "back_half" else {"tiny-text", "tiny-code"}
        assert set(fidelity["corpus"]) == corpora
        # a rank-1 readout (a two-class probe) has only its output cell
        cells = {"output", "internal", "random"} if summary["rank"] >= 2 else {"output"}
        assert set(ablation["subspace"]) == cells
        assert len(verdicts) == (0 if summary["rank"] < 2 else 2 * ablation["layer"].nunique() * 2)
        assert set(verdicts["verdict"]) <= {"holds", "reversed", "not separable"}
        assert (verdicts["p_adjusted"] >= verdicts["p_value"] - 1e-12).all()
        assert 0 <= summary["mean_cos2"] <= 1 + 1e-9
        if summary["kind"] == "back_half":
            m = config["readouts"]["define"][name]["layer"]
            assert fidelity["layer"][fidelity["view"] != "model"].max() < m
    everything = pd.read_csv(folder / "all-tokens" / "summary.tsv", sep="\t").iloc[0]
    assert everything["mean_cos2"] == pytest.approx(1.0, abs=1e-4)
    assert (workdir / "results" / "tables" / f"readouts_{run}.md").exists()
    assert (workdir / "results" / "figures" / f"readouts_{run}.png").stat().st_size > 0


# ----------------------------------------------------------------- the report


def report_frames(output: float, internal: float):
    """Constructed TSVs of one readout at two layers (zero mode): what the section reads."""
    summary = pd.DataFrame(
        [
            {
                "readout": "r",
                "kind": "masked",
                "definition": "W_U over digits tokens",
                "classes": 10,
                "k": 4,
                "mean_cos2": 0.8,
                "random_mean_cos2": 0.5,
                "smallest_angle_deg": 1.0,
            }
        ]
    )
    fidelity = pd.DataFrame(
        [
            {"readout": "r", "corpus": "c", "layer": layer, "view": view, "kl": kl}
            | {"kl_lo": kl * 0.9, "kl_hi": kl * 1.1}
            for layer, kl in ((0, 2.0), (5, 0.5))
            for view in ("tuned", "identity")
        ]
    )
    ablation = pd.DataFrame(
        [
            {"readout": "r", "layer": layer, "mode": "zero", "subspace": sub, "kl": kl}
            for layer in (0, 5)
            for sub, kl in (("output", output), ("internal", internal), ("random", 1.0))
        ]
    )
    sign = 1 if output > internal else -1
    verdicts = pd.DataFrame(
        [
            {
                "readout": "r",
                "layer": layer,
                "mode": "zero",
                "comparison": "output - internal",
                "diff": output - internal,
                "lo": output - internal - 0.1,
                "hi": output - internal + 0.1,
                "n_above": 30 if sign > 0 else 2,
                "n_sequences": 32,
                "p_adjusted": 1e-6,
                "verdict": "holds" if sign > 0 else "reversed",
            }
            for layer in (0, 5)
        ]
    )
    return summary, fidelity, ablation, verdicts


def test_report_sentence_follows_the_direction_of_the_verdicts():
    from lensspace.report.readouts import cell_table, describe

    summary, fidelity, ablation, verdicts = report_frames(3.0, 1.0)
    text = " ".join(describe(summary, fidelity, verdicts, "c"))
    assert (
        "costs more than its internal one on a significant majority of sequences in 2 of 2 "
        "layer-mode cells and less in 0" in text
    )
    assert "1.6 times as much as a random one" in text  # 0.8 / 0.5
    assert "2.000 at worst and 0.500 at best (layers 0, 5)" in text
    swapped = " ".join(describe(*report_frames(1.0, 3.0)[:2], report_frames(1.0, 3.0)[3], "c"))
    assert "in 0 of 2 layer-mode cells and less in 2" in swapped
    table = cell_table(fidelity, ablation, verdicts, "c")
    assert table["output − internal"].iloc[0].endswith("30 of 32 above, p_adj 1e-06: holds")
    assert list(table["KL output"]) == [3.0, 3.0] and list(table["layer"]) == [0, 5]
