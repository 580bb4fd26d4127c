"""A real one-node SLURM cluster for tests, from Debian's own packages.

    python -m tests.slurm.cluster start DIR     # install if missing, start, print `export SLURM_CONF=...`
    python -m tests.slurm.cluster stop DIR      # stop the daemons started in DIR

`LocalSlurm(dir, nodes=2).start()` installs `slurmctld slurmd slurm-client munge` with
apt-get when they are missing (root only), writes `slurm.conf` into `dir`, and starts
munged (on a private socket), slurmctld, and one slurmd per node in the foreground as child
processes, with every state, spool, log and pid file under `dir`; `stop()` ends exactly
those processes. Debian builds SLURM with multiple-slurmd support, so the nodes n1, n2, ...
are separate slurmd daemons on this host (own port, NodeAddr 127.0.0.1, each offering all
of this machine's CPUs): a 2-node job really runs one task per node, through two slurmds,
with a node list to expand and a first node to meet on. Nothing
outside `dir` is written besides the packages and `/etc/munge/munge.key` (created by the
package, or by `mungekey` when absent). Clients and jobs find the cluster through
`SLURM_CONF` (see `env()`). Settings and their reasons: shared/notes/local-slurm.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged")


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed and cannot be installed here (not root, no apt-get, no mirror)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def ensure_installed() -> None:
    """apt-get install the Debian packages when a binary is missing; SlurmUnavailable if that
    cannot work here."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed and installing {' '.join(PACKAGES)} needs root")
    if _which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get may be running
    for cmd in (
        ["apt-get", *lock, "update", "-q"],
        ["apt-get", *lock, "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    ):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed ({out.returncode}):\n{(out.stdout + out.stderr)[-2000:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {missing} are still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_memory_mb() -> int:
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"RealMemory=(\d+)", out).group(1))


class LocalSlurm:
    """One slurmctld and `nodes` slurmds (nodes n1..nN) on this host, all files under `root`."""

    def __init__(self, root: str | Path, nodes: int = 2, partition: str = "debug"):
        self.root = Path(root).resolve()
        self.partition = partition
        self.conf = self.root / "slurm.conf"
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus = os.cpu_count() or 1
        self._procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        """The environment for clients (sbatch, squeue, ...) and, through them, jobs."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        ensure_installed()
        for sub in ("state", "log", "munge", *(f"spool/{n}" for n in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        log = self.root / "log"
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)], log / "slurmctld.out")
        for node in self.nodes:
            cmd = [_which("slurmd"), "-D", "-f", str(self.conf), "-N", node]
            self._spawn(f"slurmd-{node}", cmd, log / f"slurmd-{node}.out")
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {log}/{name}.out and {log}/{name}.log")
            states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
            if len(states) == len(self.nodes) and all(s == "idle" for s in states):
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"nodes {self.nodes} not idle after {timeout} s (states {states}); see {log}")

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_which("mungekey"), "-c", "-f", "-k", str(key)], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o600)
        mdir = self.root / "munge"
        shutil.chown(mdir, "munge", "munge")
        mdir.chmod(0o755)  # munged refuses a socket that not everyone can reach
        self.munge_socket = mdir / "munge.socket"
        cmd = [
            _which("munged"), "-F", f"--socket={self.munge_socket}", f"--pid-file={mdir / 'munged.pid'}",
            f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}",
        ]  # fmt: skip
        self._spawn("munged", cmd, self.root / "log" / "munged.out", user="munge")  # munged refuses to run as root
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start; see {mdir / 'munged.log'}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        r, host = self.root, socket.gethostname().split(".")[0]
        mem = int(_node_memory_mb() * 0.95) // len(self.nodes)  # above slurmd -C's value the node drains
        lines = [
            "ClusterName=megarlhf-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",  # %n: the node name, one per slurmd
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmdParameters=config_overrides",  # the nodes share this machine's CPUs and memory
            # No cgroups in this sandbox: processes are tracked by parentage, limits not enforced.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            f"DefMemPerCPU={mem // self.cpus}",  # else one job takes a node's memory and jobs serialise
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.log",
            "MinJobAge=600",  # keep finished jobs visible to scontrol (there is no sacct)
            "InactiveLimit=0",
            "KillWait=30",
        ]
        lines += [
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={self.cpus} "
            f"RealMemory={mem} State=UNKNOWN"
            for n in self.nodes
        ]
        lines.append(f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str], log: Path, user: str | None = None) -> None:
        with log.open("ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env(),
                user=user, group=user, extra_groups=[] if user else None,
            )  # fmt: skip

    def stop(self) -> None:
        """SIGTERM the daemons this object started (newest first), SIGKILL after 15 s."""
        for name in reversed(list(self._procs)):
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        self.root.joinpath("daemons.pid").unlink(missing_ok=True)

    def save_pids(self) -> None:
        """For the command line: remember the daemons' PIDs so that `stop DIR` ends them."""
        self.root.joinpath("daemons.pid").write_text(
            "".join(f"{name} {p.pid}\n" for name, p in self._procs.items())
        )

    # --- client helpers ---------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        out = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Reason, StartTime, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", text))

    def logs(self, lines: int = 15) -> str:
        """The daemons' last log lines, for assertion messages."""
        out = []
        for name in ("slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes)):
            path = self.root / "log" / name
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(missing)"]
            out.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(out)

    def wait(self, job_ids, timeout: float = 300, poll: float = 0.5) -> dict[str, dict[str, str]]:
        """Block until none of `job_ids` is pending or running; their final `job()`s."""
        ids = [str(j) for j in job_ids]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.run("squeue", "-h", "-o", "%i", "-j", ",".join(ids), check=False).stdout.split()
            if not active:
                return {j: self.job(j) for j in ids}
            time.sleep(poll)
        raise TimeoutError(f"jobs {ids} still queued or running after {timeout} s: {self.run('squeue').stdout}")


def _stop_from_pidfile(root: Path) -> None:
    pids = root / "daemons.pid"
    if not pids.exists():
        print(f"no daemons recorded in {pids}")
        return
    for line in reversed(pids.read_text().splitlines()):
        name, pid = line.split()
        try:
            os.kill(int(pid), signal.SIGTERM)
            print(f"stopped {name} ({pid})")
        except ProcessLookupError:
            pass
    pids.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "stop":
        _stop_from_pidfile(root)
        return 0
    cluster = LocalSlurm(root).start()
    cluster.save_pids()
    # Leave the daemons running after this process exits (they are not in its session).
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
