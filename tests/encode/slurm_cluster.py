"""A throwaway single-node SLURM cluster on localhost, for tests/test_slurm.py (and by hand):

    python tests/slurm_cluster.py up      # prints `export SLURM_CONF=...`
    python tests/slurm_cluster.py down

Debian's slurmctld, slurmd and munge (`apt-get install slurmctld slurmd munge`), run as root: no cgroups
(proctrack/linuxproc, task/none), no accounting, cons_tres over this machine's CPUs as `slurmd -C` reports them, so
jobs asking for more CPUs than are free queue. Everything lives in one state directory (LATENTCACHE_SLURM_DIR,
default /tmp/latentcache-slurm) with its own ports, so it never touches /etc/slurm or a real cluster's daemons. Each
`up` stops the daemons a previous `up` left behind (their pid files are in that directory), wipes their state (no
stale jobs) and starts fresh ones; munged is reused when one already answers, else started and stopped by `down`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from latentcache.format.shards import process_alive

STATE_DIR = Path(os.environ.get("LATENTCACHE_SLURM_DIR", "/tmp/latentcache-slurm"))
DAEMONS = ("slurmctld", "slurmd", "munged")
MUNGE_SOCKET_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (tests skip with it)."""


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_pid_file(pid_file: Path, timeout: float = 10) -> None:
    """SIGTERM the daemon named by `pid_file` (if it is still that daemon), SIGKILL it if it lingers."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return  # gone already
    if comm not in DAEMONS:
        return  # the pid was reused by something else: not ours to kill
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)


def _munge_works() -> bool:
    try:
        cred = _run(["munge", "-n"], timeout=10)
        return cred.returncode == 0 and _run_input(["unmunge"], cred.stdout).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _run_input(cmd: list[str], stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=10)


def ensure_munge(state: Path) -> None:
    """A munged that answers: the one already running, or one started here (pid file in `state`, stopped by down)."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        made = _run(["mungekey", "--create"])
        if made.returncode != 0:
            raise SlurmUnavailable(f"no {key} and mungekey failed: {made.stderr.strip()}")
    MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
    pid_file = state / "munged.pid"
    cmd = ["munged", "--force", f"--pid-file={pid_file}", f"--log-file={state / 'munged.log'}",
           f"--seed-file={state / 'munged.seed'}"]
    try:
        # munged refuses a socket directory or key it does not own unless forced; as root, --force suffices.
        started = _run(cmd)
    except OSError as e:
        raise SlurmUnavailable(f"cannot run munged: {e}") from e
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            raise SlurmUnavailable(f"munged does not answer: {started.stderr.strip()} "
                                   f"{_tail(state / 'munged.log')}")
        time.sleep(0.2)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def node_line() -> str:
    """`slurmd -C`'s NodeName line: the node exactly as slurmd will see it (CPUs, sockets, RealMemory)."""
    probe = _run(["slurmd", "-C"])
    line = next((x for x in probe.stdout.splitlines() if x.startswith("NodeName=")), None)
    if probe.returncode != 0 or line is None:
        raise SlurmUnavailable(f"`slurmd -C` failed: {probe.stderr.strip() or probe.stdout.strip()}")
    return line


def write_conf(state: Path) -> Path:
    node = node_line()
    name = node.split()[0].split("=", 1)[1]
    conf = state / "slurm.conf"
    conf.write_text(f"""\
ClusterName=latentcache-test
SlurmctldHost={name}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
KillWait=5
{node} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=test Nodes={name} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stepds(state: Path) -> list[int]:
    """slurmstepd processes of this cluster's jobs (slurmd hands them its SLURM_CONF)."""
    mine = f"SLURM_CONF={state / 'slurm.conf'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() == "slurmstepd" \
                    and mine in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def down(state: Path = STATE_DIR) -> None:
    """Stop every daemon a previous `up` started (a reused munged was not started by it: no pid file here)."""
    for daemon in ("slurmctld", "slurmd"):
        _stop_pid_file(state / f"{daemon}.pid")
    # A job step whose slurmctld went away retries its completion message for ever: nothing else ends it.
    for pid in _stepds(state):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _stop_pid_file(state / "munged.pid")


def up(state: Path = STATE_DIR, timeout: float = 60) -> dict[str, str]:
    """Start a fresh cluster; returns the environment (SLURM_CONF) its client commands need."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster's daemons run as root; this is not root")
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "munged", "munge") if shutil.which(t) is None]
    if missing:
        raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurmctld slurmd munge)")
    state.mkdir(parents=True, exist_ok=True)
    down(state)
    for sub in ("ctld", "d"):
        shutil.rmtree(state / sub, ignore_errors=True)
        (state / sub).mkdir()
    for log in ("slurmctld.log", "slurmd.log"):
        (state / log).unlink(missing_ok=True)
    ensure_munge(state)
    conf = write_conf(state)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    # -c: no state to recover (there is none; this is a fresh cluster). -i: ignore a stale state from an old run.
    for cmd in (["slurmctld", "-c", "-i", "-f", str(conf)], ["slurmd", "-c", "-f", str(conf)]):
        started = _run(cmd, env=env)
        if started.returncode != 0:
            down(state)
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {started.stderr.strip()}")
    deadline = time.monotonic() + timeout
    while True:
        info = _run(["sinfo", "--noheader", "-o", "%T"], env=env)
        if info.returncode == 0 and info.stdout.strip() in ("idle", "mixed", "allocated"):
            return {"SLURM_CONF": str(conf)}
        if time.monotonic() > deadline:
            logs = _tail(state / "slurmctld.log") + "\n" + _tail(state / "slurmd.log")
            down(state)
            raise SlurmUnavailable(f"the node did not come up within {timeout:.0f} s (sinfo: "
                                   f"{info.stdout.strip() or info.stderr.strip()}):\n{logs}")
        time.sleep(0.3)


if __name__ == "__main__":
    if sys.argv[1:] == ["up"]:
        print(f"export SLURM_CONF={up()['SLURM_CONF']}")
    elif sys.argv[1:] == ["down"]:
        down()
    else:
        sys.exit(f"usage: {sys.argv[0]} up|down")
