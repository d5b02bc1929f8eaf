"""Circuit tasks: prompts that differ only where the task says, the metric's weights, refusals."""

import pytest
import torch

from lensspace.errors import LensspaceError
from lensspace.experiments.circuit_tasks import TaskSettings, make_task
from lensspace.models import byte_tokenizer

VOCAB = 300  # wider than the byte tokenizer's 257 tokens, as a model's unembedding may be
SETTINGS = TaskSettings(n_prompts=12, seed=3, induction_half_len=6)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def digit_ids(tokenizer) -> list[int]:
    return [tokenizer.encode(str(k), add_special_tokens=False)[0] for k in range(10)]


def test_induction_corrupts_the_first_copy_only(tokenizer):
    task = make_task("induction", tokenizer, VOCAB, SETTINGS)
    half, n = SETTINGS.induction_half_len, SETTINGS.n_prompts
    assert task.clean.shape == task.corrupt.shape == (n, 2 * half - 1)
    assert task.clean.dtype == task.corrupt.dtype == torch.long
    assert (task.clean[:, :half] != task.corrupt[:, :half]).all()
    assert torch.equal(task.clean[:, half:], task.corrupt[:, half:])
    assert torch.equal(task.clean[:, half:], task.clean[:, : half - 1])
    for row in task.clean[:, :half]:
        assert len(set(row.tolist())) == half  # nothing to copy from within the first copy
    assert task.clean.max() < len(tokenizer) - 1  # never the end-of-text token
    answer, wrong = task.clean[:, half - 1], task.corrupt[:, half - 1]
    expected = torch.zeros(n, VOCAB)
    expected[torch.arange(n), answer] = 1.0
    expected[torch.arange(n), wrong] = -1.0
    assert task.weights.dtype == torch.float32
    assert torch.equal(task.weights, expected)
    assert task.kind == "logit"
    assert task.answers == tuple(tokenizer.decode([int(t)]) for t in answer)


def test_greater_than_corrupts_the_tens_digit_only(tokenizer):
    task = make_task("greater_than", tokenizer, VOCAB, SETTINGS)
    digits = digit_ids(tokenizer)
    assert task.clean.shape == task.corrupt.shape
    changed = (task.clean != task.corrupt).nonzero()
    assert changed[:, 0].tolist() == list(range(SETTINGS.n_prompts))  # one position per prompt
    assert (changed[:, 1] == changed[0, 1]).all()
    position = int(changed[0, 1])
    assert (task.corrupt[:, position] == digits[0]).all()
    assert (task.clean[:, -2:] == torch.tensor([digits[1], digits[7]])).all()  # "... year 17"
    for row in range(SETTINGS.n_prompts):
        tens = digits.index(int(task.clean[row, position]))
        assert 2 <= tens <= 8
        expected = torch.zeros(VOCAB)
        expected[digits[tens + 1 :]] = 1.0
        expected[digits[:tens]] = -1.0
        assert torch.equal(task.weights[row], expected)
    assert task.kind == "probability"


def test_logit_metric_is_the_answer_minus_the_alternative(tokenizer):
    task = make_task("induction", tokenizer, VOCAB, SETTINGS)
    half, rows = SETTINGS.induction_half_len, torch.arange(SETTINGS.n_prompts)
    logits = torch.randn(SETTINGS.n_prompts, VOCAB, generator=torch.Generator().manual_seed(0))
    answer, wrong = task.clean[:, half - 1], task.corrupt[:, half - 1]
    expected = logits[rows, answer] - logits[rows, wrong]
    torch.testing.assert_close(task.metric(logits), expected)
    assert torch.equal(task.correct(logits), expected > 0)
    assert torch.equal(task.top1(logits), logits.argmax(-1) == answer)


def test_probability_metric_is_the_mass_above_minus_below(tokenizer):
    task = make_task("greater_than", tokenizer, VOCAB, SETTINGS)
    digits = torch.tensor(digit_ids(tokenizer))
    position = int((task.clean != task.corrupt).nonzero()[0, 1])
    logits = 3 * torch.randn(SETTINGS.n_prompts, VOCAB, generator=torch.Generator().manual_seed(1))
    logits[:, digits] += 6.0  # the digits take most of the mass, so both signs occur
    probs = logits.double().softmax(-1)
    for row in range(SETTINGS.n_prompts):
        tens = int((digits == task.clean[row, position]).nonzero())
        expected = probs[row, digits[tens + 1 :]].sum() - probs[row, digits[:tens]].sum()
        assert task.metric(logits)[row].item() == pytest.approx(expected.item(), abs=1e-6)
    peaked = torch.zeros(SETTINGS.n_prompts, VOCAB)
    peaked[:, digits[9]] = 10.0  # 9 is above every clean tens digit, which is at most 8
    assert task.top1(peaked).all() and task.correct(peaked).all()
    peaked[:, digits[9]], peaked[:, digits[0]] = 0.0, 10.0
    assert not task.top1(peaked).any() and not task.correct(peaked).any()


@pytest.mark.parametrize("name", ["induction", "greater_than"])
def test_tasks_are_seeded(tokenizer, name):
    first, again = (make_task(name, tokenizer, VOCAB, SETTINGS) for _ in range(2))
    other = make_task(name, tokenizer, VOCAB, TaskSettings(n_prompts=12, seed=4))
    for field in ("clean", "corrupt", "weights"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    assert first.texts == again.texts and first.answers == again.answers
    assert first.texts != other.texts


def test_ioi_refuses_a_tokenizer_without_single_token_names(tokenizer):
    with pytest.raises(LensspaceError, match="ioi.*no single-token names.*circuit_search.tasks"):
        make_task("ioi", tokenizer, VOCAB, SETTINGS)


def test_unknown_task_and_too_long_induction_are_refused(tokenizer):
    with pytest.raises(LensspaceError, match="unknown circuit task 'copy'"):
        make_task("copy", tokenizer, VOCAB, SETTINGS)
    with pytest.raises(LensspaceError, match="induction_half_len is 200"):
        make_task("induction", tokenizer, VOCAB, TaskSettings(induction_half_len=200))


def test_ioi_on_the_real_tokenizer_swaps_the_names_only(real):
    vocab = real.adapter.model.config.vocab_size
    task = make_task("ioi", real.tokenizer, vocab, TaskSettings(n_prompts=16, seed=5))
    assert task.clean.shape == task.corrupt.shape and task.kind == "logit"
    for row in range(16):
        changed = (task.clean[row] != task.corrupt[row]).nonzero()[:, 0]
        assert len(changed) == 3  # the two names and the subject, one token each
        answer = int(task.weights[row].argmax())
        subject = int(task.weights[row].argmin())
        assert task.weights[row, answer] == 1.0 and task.weights[row, subject] == -1.0
        assert int((task.weights[row] != 0).sum()) == 2
        names = task.clean[row, changed].tolist()
        # ABBA on even rows, BABA on odd ones; the subject gives in both
        first = (answer, subject) if row % 2 == 0 else (subject, answer)
        assert names == [*first, subject]
        assert set(task.corrupt[row, changed].tolist()).isdisjoint({answer, subject})
        assert len(set(task.corrupt[row, changed].tolist())) == 3
        assert task.answers[row] == real.tokenizer.decode([answer])


@torch.no_grad()
def test_the_real_model_solves_the_clean_prompts_and_not_the_corrupted(real):
    """SmolLM2-135M prefers the right answer on most clean prompts, and its metric drops when
    the prompt is corrupted."""
    vocab = real.adapter.model.config.vocab_size
    for name in ("ioi", "induction", "greater_than"):
        task = make_task(name, real.tokenizer, vocab, TaskSettings(n_prompts=32))
        clean = real.adapter.model(real.adapter.to_device(task.clean), use_cache=False).logits
        corrupt = real.adapter.model(real.adapter.to_device(task.corrupt), use_cache=False).logits
        assert task.correct(clean[:, -1]).float().mean() > 0.8, name
        assert task.metric(clean[:, -1]).mean() > task.metric(corrupt[:, -1]).mean(), name
