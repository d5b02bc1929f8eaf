"""A real single-node SLURM cluster on loopback, for tests/test_slurm.py.

Debian 12's SLURM 22.05: munged, MariaDB + slurmdbd (accounting: the executor plugin polls
with sacct and would wait forever without it), slurmctld and one slurmd whose node has one
fake GPU (a gres whose File= is a character device made here). Every daemon runs in the
foreground as a child of this process, so each is stopped by its own PID. Run as root.

Traps (see ../shared/notes/local-slurm.md):
- slurm.conf must be /etc/slurm/slurm.conf: the plugin's job step drops SLURM_CONF before
  its inner srun, which then looks the cluster up over DNS. Nothing here leaves 127.0.0.1.
- munged's socket folder must be mode 711.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CONF_DIR = Path("/etc/slurm")
MARKER = "# written by lensspace tests/slurm_cluster.py"
PACKAGES = ["slurm-wlm", "munge", "slurmdbd", "mariadb-server"]
BINARIES = [
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "munged",
    "mariadbd",
    "mariadb-install-db",
    "sacct",
    "sacctmgr",
    "sbatch",
    "scancel",
    "squeue",
]
# Not SLURM's default ports, so a system's own daemons (if any) never answer our clients.
PORTS = {"slurmctld": 16817, "slurmd": 16818, "slurmdbd": 16819, "mariadb": 13306}
CLUSTER = "lensspace-ci"


def unavailable() -> str | None:
    """Why this machine cannot host the test cluster, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the SLURM cluster test runs as root (it installs packages and starts daemons)"
    if not shutil.which("apt-get") and not all(shutil.which(b) for b in BINARIES):
        return "no apt-get to install SLURM, and SLURM is not installed"
    conf = CONF_DIR / "slurm.conf"
    if conf.exists() and MARKER not in conf.read_text(errors="replace"):
        return f"{conf} belongs to a real SLURM installation; the test will not replace it"
    for name, port in PORTS.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return f"port {port} (for {name}) is already in use on 127.0.0.1"
    return None


def install(timeout: int = 240) -> float:
    """Install the Debian packages unless present; returns the seconds it took.

    Package scripts must not start daemons of their own (we could not stop them by PID), so a
    policy-rc.d that refuses every start is in place during the install, as in Docker images.
    """
    start = time.monotonic()
    if all(shutil.which(b) for b in BINARIES):
        return 0.0
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text(
            "#!/bin/sh\n# lensspace tests: no daemon starts during apt-get\nexit 101\n"
        )
        policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        ):
            done = subprocess.run(
                ["timeout", "-s", "KILL", str(timeout), *cmd],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}"
                )
    finally:
        if ours:
            policy.unlink()
    return time.monotonic() - start


def _run(*cmd: str, timeout: int = 30, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        ["timeout", "-s", "KILL", str(timeout), *cmd], capture_output=True, text=True
    )
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({done.returncode}): {done.stdout}{done.stderr}"
        )
    return done


def _wait_for(what: str, probe, timeout: float = 60, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(every)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


class Cluster:
    """The daemons, their files under ``prefix``, and the configs in /etc/slurm."""

    def __init__(self, partition: str = "gpu-ci", account: str = "lensspace-ci"):
        # Not under pytest's tmp folders: those are root-only, and munged and mariadbd run as
        # their own users. Removed again by stop().
        self.prefix = Path(tempfile.mkdtemp(prefix="lensspace-slurm-", dir="/var/tmp"))
        self.partition = partition
        self.account = account
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.written: list[Path] = []
        self.munge_socket = self.prefix / "munge" / "munge.socket.2"
        self.db_socket = self.prefix / "mysql" / "mysqld.sock"

    # ---- start ---------------------------------------------------------------------------
    def start(self) -> float:
        """Start every daemon; returns the seconds it took."""
        start = time.monotonic()
        for sub in ("munge", "mysql/data", "spool/ctld", "spool/d", "log", "run", "dev"):
            (self.prefix / sub).mkdir(parents=True, exist_ok=True)
        self.prefix.chmod(0o755)
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        self._start_slurmdbd()
        self._start("slurmctld", ["slurmctld", "-D", "-i"])
        self._start("slurmd", ["slurmd", "-D", "-N", self.host])
        _wait_for(
            "the node",
            lambda: _run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.strip() == "idle",
        )
        return time.monotonic() - start

    def _start(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        log = open(self.prefix / "log" / f"{name}.stdout", "w")
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        log.close()
        self.procs[name] = proc
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at once ({proc.returncode}); see {log.name}")
        return proc

    def _start_munge(self) -> None:
        folder = self.prefix / "munge"
        key = folder / "munge.key"
        key.write_bytes(os.urandom(128))  # this cluster's own key: nothing else can talk to it
        key.chmod(0o600)
        shutil.chown(folder, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        folder.chmod(0o711)  # munged insists on it
        self._start(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={folder}/munged.pid",
                f"--log-file={folder}/munged.log",
                f"--seed-file={folder}/munged.seed",
            ],
            user="munge",
            group="munge",
        )
        _wait_for("munged", self.munge_socket.exists, timeout=20)

    def _start_mariadb(self) -> None:
        data = self.prefix / "mysql" / "data"
        shutil.chown(self.prefix / "mysql", "mysql", "mysql")
        shutil.chown(data, "mysql", "mysql")
        _run(
            "mariadb-install-db",
            "--no-defaults",
            "--user=mysql",
            f"--datadir={data}",
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
            timeout=120,
        )
        self._start(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                "--user=mysql",
                f"--datadir={data}",
                f"--socket={self.db_socket}",
                f"--pid-file={self.prefix}/mysql/mysqld.pid",
                "--bind-address=127.0.0.1",
                f"--port={PORTS['mariadb']}",
                f"--log-error={self.prefix}/log/mariadb.err",
                "--skip-name-resolve",
            ],
        )
        client = ["mariadb", "--no-defaults", f"--socket={self.db_socket}", "-u", "root"]
        _wait_for("mariadbd", lambda: _run(*client, "-e", "SELECT 1", check=False).returncode == 0)
        _run(
            *client,
            "-e",
            "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'lensspace-ci';"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';",
        )

    def _write_configs(self) -> None:
        ncpu = os.cpu_count() or 1
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        # The node advertises at least 16 GB (config_overrides: slurmd does not check): the
        # rules' requests are sized for the paper study, and nothing enforces them here
        # (task/none), so a small CI machine still schedules every job.
        node_mem = max(int(mem_mb * 0.9), 16000)
        fake_gpu = self.prefix / "dev" / "nvidia0"
        if not fake_gpu.exists():
            os.mknod(fake_gpu, 0o666 | 0o020000, os.makedev(1, 3))  # a char device, as /dev/null
        p = self.prefix
        slurm_conf = f"""{MARKER}
ClusterName={CLUSTER}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={PORTS["slurmctld"]}
SlurmdPort={PORTS["slurmd"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={p}/spool/ctld
SlurmdSpoolDir={p}/spool/d
SlurmctldPidFile={p}/run/slurmctld.pid
SlurmdPidFile={p}/run/slurmd.pid
SlurmctldLogFile={p}/log/slurmctld.log
SlurmdLogFile={p}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MpiDefault=none
MinJobAge=600
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={PORTS["slurmdbd"]}
AccountingStoragePass={self.munge_socket}
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={ncpu} RealMemory={node_mem} Gres=gpu:1 State=UNKNOWN
PartitionName={self.partition} Nodes={self.host} Default=NO MaxTime=INFINITE State=UP
"""
        slurmdbd_conf = f"""{MARKER}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdHost={self.host}
DbdAddr=127.0.0.1
DbdPort={PORTS["slurmdbd"]}
SlurmUser=root
LogFile={p}/log/slurmdbd.log
PidFile={p}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={PORTS["mariadb"]}
StorageUser=slurm
StoragePass=lensspace-ci
StorageLoc=slurm_acct_db
"""
        gres_conf = f"{MARKER}\nName=gpu File={fake_gpu}\n"
        CONF_DIR.mkdir(parents=True, exist_ok=True)
        for name, text, mode in (
            ("slurm.conf", slurm_conf, 0o644),
            ("gres.conf", gres_conf, 0o644),
            ("slurmdbd.conf", slurmdbd_conf, 0o600),
        ):
            path = CONF_DIR / name
            if path.exists() and MARKER not in path.read_text(errors="replace"):
                raise RuntimeError(f"{path} exists and is not ours")
            path.write_text(text)
            path.chmod(mode)
            self.written.append(path)

    def _start_slurmdbd(self) -> None:
        self._start("slurmdbd", ["slurmdbd", "-D"])
        _wait_for(
            "slurmdbd",
            lambda: (
                _run("sacctmgr", "-n", "list", "cluster", timeout=10, check=False).returncode == 0
            ),
        )
        _run("sacctmgr", "-i", "add", "cluster", CLUSTER)
        _run("sacctmgr", "-i", "add", "account", self.account, f"cluster={CLUSTER}")
        _run(
            "sacctmgr", "-i", "add", "user", "root", f"account={self.account}", f"cluster={CLUSTER}"
        )

    # ---- use -----------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        """Every job (allocation, not steps) in the accounting database, as dicts."""
        fields = ["JobID", "State", "Partition", "Account", "AllocTRES", "ExitCode", "Comment"]
        out = _run(
            "sacct",
            "-X",
            "-n",
            "-P",
            "-a",
            "--starttime",
            "2000-01-01",
            f"--format={','.join(fields)}",
        ).stdout
        return [
            dict(zip(fields, line.split("|", len(fields) - 1))) for line in out.splitlines() if line
        ]

    def queue(self) -> list[dict]:
        out = _run("squeue", "-h", "-o", "%i|%T|%k").stdout
        return [
            dict(zip(["JobID", "State", "Comment"], line.split("|", 2)))
            for line in out.splitlines()
            if line
        ]

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, stop every daemon by PID (TERM, then KILL), remove our configs."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            _run("scancel", "--full", "-u", "root", check=False, timeout=15)
            try:
                _wait_for("an empty queue", lambda: not self.queue(), timeout=20)
            except Exception:
                pass
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()
        shutil.rmtree(self.prefix, ignore_errors=True)

    def log_tails(self, lines: int = 15) -> str:
        """The end of every daemon's log, for a failing test's message."""
        parts = []
        for log in sorted((self.prefix / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(parts)
