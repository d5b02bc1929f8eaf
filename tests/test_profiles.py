"""The execution profiles: profiles/default (local) and profiles/slurm (cluster)."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import ROOT, snakemake

SLURM = ROOT / "profiles" / "slurm" / "config.yaml"
DEFAULT = ROOT / "profiles" / "default" / "config.yaml"
NETWORK_RULES = {"prepare_model", "prepare_corpus", "fetch_lens"}  # downloads: no internet on nodes


def rule_blocks() -> dict[str, str]:
    """Every rule's text in rules/*.smk, by rule name."""
    blocks = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        parts = re.split(r"^rule (\w+):\n", smk.read_text(), flags=re.M)
        blocks.update(dict(zip(parts[1::2], parts[2::2])))
    return blocks


def local_rules() -> set[str]:
    names = set()
    for smk in (ROOT / "rules").glob("*.smk"):
        for block in re.findall(r"^localrules:\n((?:\s+\w+,?\n)+)", smk.read_text(), re.M):
            names.update(re.findall(r"\w+", block))
    return names


def test_gpu_is_requested_by_exactly_the_rules_that_run_on_the_device():
    """A rule runs torch on the GPU iff its params pass `device=config["device"]`; exactly
    those get `gpu: 1` on the cluster, so no CPU rule ever holds a GPU."""
    profile = yaml.safe_load(SLURM.read_text())
    gpu = {rule for rule, res in profile["set-resources"].items() if res.get("gpu")}
    on_device = {rule for rule, text in rule_blocks().items() if 'device=config["device"]' in text}
    assert on_device and gpu == on_device
    assert all(res.get("gpu") in (None, 1) for res in profile["set-resources"].values())
    assert "gpu" not in str(profile["default-resources"])


def test_network_rules_stay_on_the_submit_host():
    assert NETWORK_RULES <= local_rules()
    assert NETWORK_RULES <= set(rule_blocks())


def test_slurm_profile_settings_and_their_reasons():
    text = SLURM.read_text()
    profile = yaml.safe_load(text)
    assert profile["executor"] == "slurm"
    assert profile["retries"] >= 1 and profile["rerun-incomplete"] is True
    assert profile["latency-wait"] >= 30 and "slurm-init-seconds-before-status-checks" in profile
    assert profile["slurm-status-command"] == "squeue"  # see the comment there: scancel
    resources = profile["default-resources"]
    assert {"slurm_partition", "slurm_account", "mem_mb", "runtime"} <= set(resources)
    # every entry carries a comment saying why: top-level settings and each rule's or
    # resource's entry on its own line, or (for a mapping) on the line above
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[\w-]+:\s*[^\s#]", line) or re.match(r"^  \w+:", line):
            assert "#" in line or lines[i - 1].lstrip().startswith("#"), f"no reason given: {line}"


def test_default_profile_does_not_undo_the_slurm_profile():
    """profiles/default is the workflow profile, so it is loaded after `--profile profiles/slurm`
    and its keys win: it must not set any key the SLURM profile sets differently."""
    default = yaml.safe_load(DEFAULT.read_text())
    slurm = yaml.safe_load(SLURM.read_text())
    clashes = {k for k in default if k in slurm and default[k] != slurm[k]}
    assert not clashes
    assert "executor" not in default and "default-resources" not in default


@pytest.mark.workflow
def test_slurm_profile_parses_and_resolves_names_from_the_environment(tmp_path):
    """A dry run under the profile: Snakemake reads it, evaluates every resource expression."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["corpora"]["tiny-text"]["path"] = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(
        tmp_path,
        "--profile",
        str(SLURM.parent),
        "--configfile",
        str(tmp_path / "study.yaml"),
        "-n",
        "-p",
        timeout=300,
        env={"LENSSPACE_SLURM_PARTITION": "gpu-test", "LENSSPACE_SLURM_GPU_MODEL": "a100"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "Using profile" in out and "profiles/slurm" in out


def _planned_jobs(out: str, rule: str) -> int:
    """How many jobs of ``rule`` a dry run's job-stats table plans (0 if none)."""
    found = re.search(rf"^{rule}\s+(\d+)$", out, re.M)
    return int(found[1]) if found else 0


@pytest.mark.workflow
def test_laptop_batches_an_experiments_layers_and_slurm_runs_one_job_per_layer(tmp_path):
    """layers_per_job: the schema's default batches the tiny model's 3 H0 layers into one job
    (start-up paid once); the SLURM profile passes layers_per_job=1, so the cluster gets one
    job per layer, named by the layer as before."""
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["corpora"]["tiny-text"]["path"] = str(ROOT / "tests" / "data" / "tiny_corpus.txt")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    target = "results/tiny-llama/h0/ablation.tsv"
    args = ("--configfile", str(tmp_path / "study.yaml"), "-n", target)
    laptop = snakemake(tmp_path, *args, timeout=300)
    two = snakemake(tmp_path, *args, "--config", "layers_per_job=2", timeout=300)
    cluster = snakemake(tmp_path, "--profile", str(SLURM.parent), *args, timeout=300)
    for done in (laptop, two, cluster):
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert _planned_jobs(laptop.stdout, "h0_layer") == 1
    assert "results/tiny-llama/h0/layers/0_1_2.tsv" in laptop.stdout
    assert _planned_jobs(two.stdout, "h0_layer") == 2
    assert "results/tiny-llama/h0/layers/0_1.tsv" in two.stdout
    assert _planned_jobs(cluster.stdout, "h0_layer") == 3
    assert all(f"results/tiny-llama/h0/layers/{layer}.tsv" in cluster.stdout for layer in range(3))


def test_readme_gives_the_cluster_command_for_the_paper_config():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## SLURM", 1)[1].split("\n## ", 1)[0]
    assert (
        ".venv/bin/snakemake --profile profiles/slurm --configfile configs/paper-gpt2.yaml"
        in section
    )
    for variable in (
        "LENSSPACE_SLURM_PARTITION",
        "LENSSPACE_SLURM_ACCOUNT",
        "LENSSPACE_SLURM_GPU_MODEL",
    ):
        assert variable in section and variable in SLURM.read_text()
