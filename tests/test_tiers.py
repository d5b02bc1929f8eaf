"""Every test is in exactly one tier, and the fast loop (``-m unit``) never reaches the real model
or Snakemake: the tiers are derived in conftest.py, and these tests check that derivation."""

import pytest
from conftest import REAL_MODEL_FIXTURES, TIERS, WORKFLOW_FIXTURES, snakemake, tier_of


def test_fixtures_decide_the_tier():
    assert tier_of({"tmp_path", "tiny"}, set()) == "unit"
    assert tier_of({"real", "runner"}, set()) == "real_model"
    assert tier_of({"real", "tiny_run"}, set()) == "workflow"
    assert tier_of({"slurm_run", "cluster", "tiny_run"}, set()) == "workflow"


def test_a_marker_can_only_make_a_test_slower():
    assert tier_of({"tmp_path"}, {"workflow"}) == "workflow"
    assert tier_of({"real"}, {"workflow"}) == "workflow"
    with pytest.raises(ValueError, match="marked unit, but its fixtures"):
        tier_of({"real"}, {"unit"})
    with pytest.raises(ValueError, match="marked real_model, but its fixtures"):
        tier_of({"tiny_run"}, {"real_model"})
    with pytest.raises(ValueError, match="more than one tier marker"):
        tier_of(set(), {"unit", "workflow"})


def test_every_collected_test_has_one_tier_that_fits_its_fixtures(request):
    for item in request.session.items:
        tiers = [mark.name for mark in item.iter_markers() if mark.name in TIERS]
        assert len(tiers) == 1, (item.nodeid, tiers)
        fixtures = set(getattr(item, "fixturenames", ()))
        if tiers == ["unit"]:
            assert not fixtures & (REAL_MODEL_FIXTURES | WORKFLOW_FIXTURES), item.nodeid
        if tiers == ["real_model"]:
            assert not fixtures & WORKFLOW_FIXTURES, item.nodeid


def test_snakemake_outside_the_workflow_tier_fails(tmp_path):
    """A unit test that starts Snakemake without saying so fails before Snakemake starts."""
    with pytest.raises(pytest.fail.Exception, match="Snakemake run in a test outside"):
        snakemake(tmp_path, "-n")
