"""The compiled vocabulary kernel of H0 (lensspace.fused) against its definition in float64."""

import pytest
import torch

from lensspace import fused


def _inputs(n: int, v: int, scale: float, seed: int = 0) -> list[torch.Tensor]:
    """A distribution ``p`` and a logit change of about ``scale`` nats, with H0's shapes."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, v, generator=gen) * 3, -1)
    a = torch.randn(n, v, generator=gen) * 20
    d = torch.randn(n, v, generator=gen) * scale
    k1 = torch.rand(n, 1, generator=gen) * scale * 1e-2
    k2 = torch.rand(n, 1, generator=gen) + 0.5
    vec = torch.randn(v, generator=gen) * scale
    k3 = torch.rand(n, 1, generator=gen)
    t = a * k1 - d * k2 + vec * k3
    c = (p.double() * t.double()).sum(-1, keepdim=True).float()  # E_p[delta]: t stays near 0
    return [p, a, d, k1, k2, vec, k3, c]


@pytest.mark.parametrize("scale", [1e-4, 1e-2, 1.0, 5.0])
def test_compiled_kernel_equals_the_definition(scale):
    """Every sum, and the KL ``log1p(E_p[expm1 t]) - E_p[t]`` built from them, for KLs from about
    1e-9 to several nats: the compiled loop equals the definition run eagerly on the same float32
    inputs (only the order of summation differs), and both equal float64 to the rounding of
    ``t``."""
    args = _inputs(37, 5003, scale)
    sums = fused.change_sums(*args)
    assert sums is not None, fused.change_sums.failed
    s0, s1, t_max = sums
    e0, e1, e_max = fused.change_sums_definition(*args)
    r0, r1, _ = fused.change_sums_definition(*(x.double() for x in args))
    kl, eager, ref = torch.log1p(s1) - s0, torch.log1p(e1) - e0, torch.log1p(r1) - r0
    assert (ref > 0).all()
    torch.testing.assert_close(kl, eager, rtol=1e-5, atol=1e-15)
    torch.testing.assert_close(t_max, e_max, rtol=0.0, atol=0.0)
    # float32 t carries about 6e-8 of |a k1| + |d k2| + ...: relative to the KL, largest at 1e-9
    torch.testing.assert_close(kl, ref, rtol=5e-3 if scale < 1e-3 else 1e-5, atol=1e-14)


def test_large_rows_kernel_counts_the_terms_float32_flushes_to_zero():
    """Rows whose logit change passes SAFE_EXPONENT at tokens of clean log-probability about -110
    (``p`` is 0 in float32) and changes of 120 to 150 (``e^t`` past float32's range): the compiled
    loop's ``E_p[expm1 t]`` equals float64's sum over ``exp(log p) expm1(t)``, where a float32
    ``p * expm1(t)`` would miss those terms or overflow."""
    gen = torch.Generator().manual_seed(3)
    n, v = 9, 4001
    p, a, d, k1, k2, vec, k3, c = _inputs(n, v, 1.0, seed=3)
    inv_s = torch.rand(n, 1, generator=gen) * 0.05 + 0.02
    c0 = torch.randn(v, generator=gen)
    rare = torch.randint(0, v, (n, 3), generator=gen)
    rows_index = torch.arange(n).unsqueeze(-1)
    c0[
        rare.flatten()
    ] = -100.0  # log p about -110 there: below float32's smallest subnormal (e^-103)
    log_z = torch.logsumexp((a * inv_s + c0).double(), -1, keepdim=True).float()
    log_p = (a * inv_s + c0 - log_z).double()
    p = log_p.exp().float()
    assert (p[rows_index, rare] == 0).all()
    jump = torch.linspace(120.0, 150.0, n * 3).reshape(n, 3)
    d[rows_index, rare] -= (
        jump / k2
    )  # t there: about 120 to 150 nats, log p + t from about 10 to 40
    rows = torch.tensor([0, 2, 3, 5, 8])
    (sums,) = fused.large_rows(rows, p, a, d, k1, k2, vec, k3, c, inv_s, c0, log_z)
    t = (a * k1 - d * k2 + vec * k3 - c).double()[rows]
    want = (log_p[rows].exp() * torch.expm1(t)).sum(-1, keepdim=True)
    assert (want > 100).all()  # the flushed terms dominate: the float32 sum would give about 1
    torch.testing.assert_close(
        sums, want, rtol=1e-4, atol=0.0
    )  # float32 t: 1e-7 of 130 in an exponent
    eager = fused.large_rows_definition(rows, p, a, d, k1, k2, vec, k3, c, inv_s, c0, log_z)[0]
    torch.testing.assert_close(sums, eager, rtol=1e-6, atol=0.0)


def test_expm1_keeps_relative_precision_near_zero():
    """The kernel's ``expm1`` (inductor compiles torch.expm1 as exp - 1) against float64 expm1,
    compiled."""
    t = torch.cat([torch.logspace(-12, 1.5, 4000), -torch.logspace(-12, 1.5, 4000), torch.zeros(1)])
    got = torch.compile(fused.expm1, dynamic=True)(t).double()
    want = torch.expm1(t.double())
    torch.testing.assert_close(
        got, want, rtol=1e-6, atol=0.0
    )  # a few float32 ulps; exp - 1 misses by 1.0 near 0


def test_a_failed_compile_falls_back_to_eager(monkeypatch, capsys):
    """Without a working compiler the kernel answers None once, says why, and is not used again."""
    kernel = fused._Kernel(fused.change_sums_definition)

    def broken(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    args = _inputs(4, 50, 1.0)
    assert not kernel.usable(args[0])  # too small to pay for the kernels' loading: eager
    monkeypatch.setattr(fused, "MIN_ELEMENTS", 0)
    assert kernel.usable(args[0])
    assert kernel(*args) is None
    assert not kernel.usable(args[0])
    assert "no C++ compiler found" in capsys.readouterr().err


def test_first_call_is_logged_once_and_read_back_as_a_jobs_kernel_time(capsys, tmp_path):
    """A kernel's first call (loading or compiling, then the call) prints its seconds once; the
    log line reads back through ``provenance.logged_startups`` beside a job's start-up line, as
    ``benchmarks/roofline.py`` reads a run's logs."""
    from lensspace import provenance
    from lensspace.runtime import STARTUP_LINE

    kernel = fused._Kernel(fused.change_sums_definition)
    args = _inputs(4, 50, 1.0)
    assert kernel(*args) is not None and kernel(*args) is not None
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith(fused.FIRST_CALL_LINE)
    ]
    assert len(lines) == 1 and "change_sums_definition" in lines[0]
    seconds = float(lines[0][len(fused.FIRST_CALL_LINE) :].split()[1])
    assert 0 <= seconds < 600  # 0.00 where this process compiled the definition already
    log = tmp_path / "logs" / "h0_layer" / "run" / "0_15.log"
    log.parent.mkdir(parents=True)
    log.write_text(
        f"[lensspace] rule h0_layer\n{STARTUP_LINE} 4.25 s from the process's start\n{lines[0]}\n"
        # after a progress bar's first draw
        f"h0:   0%|          | 0/8 [00:00<?, ?it/s]{lines[0]}\n"
        f"{fused.FIRST_CALL_LINE} kl_terms_definition\n"
    )  # a line cut short is skipped
    (tmp_path / "logs" / "tokenize").mkdir()
    (tmp_path / "logs" / "tokenize" / "run.log").write_text(
        "[lensspace] rule tokenize\n"
    )  # no model: no row
    rows = provenance.logged_startups(tmp_path)
    assert rows.to_dict("records") == [
        {
            "rule": "h0_layer",
            "job": "run/0_15",
            "startup_s": 4.25,
            "kernels_s": pytest.approx(2 * seconds),
        }
    ]
