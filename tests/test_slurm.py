"""The workflow on a real SLURM cluster through `--profile profiles/slurm`.

A single-node cluster (tests/slurm_cluster.py: munged, MariaDB, slurmdbd, slurmctld, slurmd
with one fake GPU) is installed and started here, as root; the tiny study's `tiny-gpt2` run
goes through the profile, and its tables must equal the local run's (`tiny_run`) byte for
byte. Every Snakemake run is bounded by `timeout -s KILL`; the cluster's finalizer cancels
every job and stops every daemon by PID, also when a test fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from conftest import ROOT

pytestmark = pytest.mark.workflow

RUN = "tiny-gpt2"
# The run's lens and H0 outputs: every kind of job (the GPU rules cache, train, eval and
# per-layer ablations; the CPU rules tokenize, SVD, merge, table, figures) in 12 jobs. The
# other experiments add more jobs of the same kinds, not coverage, and would break the
# 5-minute budget of this test (each job starts Snakemake twice and the script once).
TARGETS = [
    f"results/{RUN}/lens_eval.tsv",
    f"results/{RUN}/svd/spectrum.tsv",
    f"results/{RUN}/h0/ablation.tsv",
    f"results/tables/h0_{RUN}.md",
    f"results/figures/h0_{RUN}.png",
    f"results/figures/lens_{RUN}.png",
]
PROFILE = ROOT / "profiles" / "slurm"
RUN_LIMIT = 600  # seconds: hard limit of one Snakemake run through SLURM
# Latency settings for a loopback cluster whose jobs last seconds (the profile's are for a
# real one); everything else comes from the profile.
FAST = [
    "--slurm-init-seconds-before-status-checks",
    "1",
    "--seconds-between-status-checks",
    "1",
    "--max-status-checks-per-second",
    "1",
    "--latency-wait",
    "5",
]


@pytest.fixture(scope="module")
def cluster(request):
    reason = slurm_cluster.unavailable()
    if reason:
        pytest.skip(reason)
    t0 = time.monotonic()
    installed = slurm_cluster.install()
    c = slurm_cluster.Cluster()
    request.addfinalizer(c.stop)  # registered before start: a half-started cluster is stopped too
    started = c.start()
    total = time.monotonic() - t0
    print(f"\nSLURM: install {installed:.0f} s, daemons {started:.0f} s, total {total:.0f} s")
    return c


def gpu_rules() -> set[str]:
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}


def run_snakemake(
    workdir: Path, cluster, *args: str, limit: int = RUN_LIMIT, background: bool = False
):
    cmd = [
        "timeout",
        "-s",
        "KILL",
        str(limit),
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "study.yaml"),
        "--profile",
        str(PROFILE),
        *FAST,
        *args,
    ]
    env = {
        **__import__("os").environ,
        "LENSSPACE_SLURM_PARTITION": cluster.partition,
        "LENSSPACE_SLURM_ACCOUNT": cluster.account,
    }
    if background:
        log = open(workdir / f"snakemake-{time.monotonic_ns()}.log", "w+")
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=workdir
        ), log
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=workdir, timeout=limit + 30
    )


def expected_jobs(workdir: Path) -> Counter:
    """Rule instances a fresh run submits to SLURM: the dry run's job stats minus local rules."""
    dry = subprocess.run(
        [
            "timeout",
            "-s",
            "KILL",
            "120",
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "study.yaml"),
            "-n",
            *TARGETS,
            "--config",
            "layers_per_job=1",
        ],  # as profiles/slurm sets it
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert dry.returncode == 0, dry.stderr[-3000:]
    stats = (dry.stdout + dry.stderr).split("Job stats:", 1)[1].split("\n\n", 1)[0]
    counts = Counter({m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", stats, re.M)})
    local = set()
    for smk in (ROOT / "rules").glob("*.smk"):
        for block in re.findall(r"^localrules:\n((?:\s+\w+,?\n)+)", smk.read_text(), re.M):
            local.update(re.findall(r"\w+", block))
    for rule in local | {"all", "total"}:
        counts.pop(rule, None)
    return counts


def rule_of(job: dict) -> str:
    """The rule name in the plugin's job comment: rule_{name}_wildcards_{...} or rule_{name}."""
    return re.match(r"rule_(\w+?)(?:_wildcards_|$)", job["Comment"])[1]


def tables(results: Path) -> dict[str, bytes]:
    """The SLURM run's tables (every TSV under results/{RUN}/ and the H0 table), as bytes; not the
    per-job intermediates, whose names follow layers_per_job (one layer a job on SLURM)."""
    per_job = {"layers", "sequences", "share_layers"}
    files = [
        *(f for f in (results / RUN).rglob("*.tsv") if f.parent.name not in per_job),
        results / "tables" / f"h0_{RUN}.md",
    ]
    return {str(f.relative_to(results)): f.read_bytes() for f in files}


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """One study (the tiny config's tiny-gpt2 run) run through the profile to completion."""
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["runs"] = {RUN: config["runs"][RUN]}
    config["corpora"]["tiny-text"]["path"] = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
    (workdir / "study.yaml").write_text(yaml.safe_dump(config))
    expected = expected_jobs(workdir)
    before = {j["JobID"] for j in cluster.jobs()}
    t0 = time.monotonic()
    done = run_snakemake(workdir, cluster, *TARGETS)
    print(f"\nSLURM run of {RUN}: {time.monotonic() - t0:.0f} s")
    jobs = [j for j in cluster.jobs() if j["JobID"] not in before]
    assert done.returncode == 0, done.stderr[-5000:] + cluster.log_tails()
    return workdir, expected, jobs


def test_one_slurm_job_per_rule_instance(slurm_run, cluster):
    _, expected, jobs = slurm_run
    assert Counter(rule_of(j) for j in jobs) == expected
    assert len({j["Comment"] for j in jobs}) == len(jobs)  # no instance submitted twice
    for job in jobs:
        assert job["State"] == "COMPLETED" and job["ExitCode"] == "0:0", job
        assert job["Partition"] == cluster.partition, job  # from LENSSPACE_SLURM_PARTITION
        assert job["Account"] == cluster.account, job  # from LENSSPACE_SLURM_ACCOUNT


def test_gpu_only_on_gpu_rules(slurm_run):
    _, expected, jobs = slurm_run
    gpu = gpu_rules()
    assert gpu & set(expected) and set(expected) - gpu  # both kinds ran
    for job in jobs:
        holds_gpu = "gres/gpu=1" in job["AllocTRES"].split(",")
        assert holds_gpu == (rule_of(job) in gpu), job
        if not holds_gpu:
            assert "gres/gpu" not in job["AllocTRES"], job


def test_slurm_results_equal_local_results(slurm_run, tiny_run):
    workdir, _, _ = slurm_run
    local, _ = tiny_run
    ours = tables(workdir / "results")
    theirs = {name: (local / "results" / name).read_bytes() for name in ours}
    assert len(ours) >= 6
    different = [name for name in ours if ours[name] != theirs[name]]
    assert not different


def test_cancelled_job_fails_visibly_and_rerun_completes(slurm_run, cluster, tiny_run):
    workdir, _, _ = slurm_run
    local, _ = tiny_run
    before = {j["JobID"] for j in cluster.jobs()}
    # Take away one H0 layer and everything made from it, run again, and cancel that layer's
    # job while it runs. --retries 0: with the profile's retries the cancelled job would be
    # reported and resubmitted at once.
    target = f"results/{RUN}/h0/layers/1.tsv"
    for name in (
        target,
        f"results/{RUN}/h0/ablation.tsv",
        f"results/tables/h0_{RUN}.md",
        f"results/figures/h0_{RUN}.png",
    ):
        (workdir / name).unlink()
    proc, log = run_snakemake(workdir, cluster, "--retries", "0", *TARGETS, background=True)
    cancelled = None
    try:
        deadline = time.monotonic() + 120
        while cancelled is None and time.monotonic() < deadline and proc.poll() is None:
            running = [
                j for j in cluster.queue() if j["State"] == "RUNNING" and "h0_layer" in j["Comment"]
            ]
            if running:
                cancelled = running[0]
                subprocess.run(["scancel", cancelled["JobID"]], check=True, timeout=30)
            time.sleep(0.2)
        proc.wait(timeout=RUN_LIMIT + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    out = log.read()
    log.close()
    assert cancelled is not None, "no h0_layer job was seen running\n" + out[-4000:]
    assert proc.returncode != 0, out[-4000:]
    # visible: the run names the failed rule and the SLURM job id; SLURM says CANCELLED
    assert "Error in rule h0_layer" in out and f"SLURM-job '{cancelled['JobID']}'" in out, out[
        -4000:
    ]
    assert "CANCELLED" in out, out[-4000:]
    state = {j["JobID"]: j["State"] for j in cluster.jobs()}[cancelled["JobID"]]
    assert state.startswith("CANCELLED"), state
    assert cancelled["Comment"] == f"rule_h0_layer_wildcards_{RUN}_1", cancelled  # run, layer
    assert not (workdir / target).exists()

    mid = {j["JobID"] for j in cluster.jobs()}
    again = run_snakemake(workdir, cluster, *TARGETS)
    assert again.returncode == 0, again.stderr[-5000:]
    rerun = [j for j in cluster.jobs() if j["JobID"] not in mid]
    assert sorted(rule_of(j) for j in rerun) == ["h0_figure", "h0_layer", "h0_merge", "h0_table"]
    assert all(j["State"] == "COMPLETED" for j in rerun), rerun
    assert not before & {j["JobID"] for j in rerun}
    assert tables(workdir / "results") == {
        name: (local / "results" / name).read_bytes() for name in tables(workdir / "results")
    }
