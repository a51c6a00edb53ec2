"""Against a real Slurm: the dev cluster (slurm/dev-cluster), submitit jobs, preemption and requeue.

The session's cluster (tests/slurm_cluster.py: two nodes) runs under a temporary root on free ports.
Needs root and the Debian packages (`make slurm-packages`); about 3-4 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaleforge import rundir
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import RunEntry, entries_from_plan, entries_from_specs
from scaleforge.orchestrator.run.executors import slurm as slurm_ex
from scaleforge.orchestrator.run.executors import slurm_states
from slurm_cluster import DEV_CLUSTER, REPO
from slurm_cluster import wait_for as _wait
from test_runs import tiny_spec, write_plan

pytestmark = pytest.mark.slurm

CLIENTS = ("sbatch", "squeue", "sacct", "sinfo", "scancel", "srun")  # no scontrol: see below


@pytest.fixture
def client_path(tmp_path):
    """A PATH with Slurm's client commands but without scontrol: the requeue path must not need it
    (on many clusters scontrol exists on login nodes only, submitit#1601)."""
    shim = tmp_path / "slurm-clients"
    shim.mkdir()
    for name in CLIENTS:
        (shim / name).symlink_to(shutil.which(name))
    assert shutil.which("scontrol", path=str(shim)) is None
    return f"{shim}:{Path(sys.executable).parent}"


def _env(path: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    if path:
        env["PATH"] = path
    return env


def _orchestrate(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleforge.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=120)


def _sacct(job_ids) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j",
                          ",".join(sorted({j.split("_")[0] for j in job_ids}))],
                         capture_output=True, text=True, check=True)
    return slurm_states.parse_slurm_table(out.stdout)


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%T", "-j", job_id], capture_output=True,
                         text=True)
    return out.stdout.strip()


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _all_jobs() -> set[str]:
    """Every job id the cluster knows (array tasks as their array's id).

    The controller answers at once; accounting (sacct) can lag a submission by seconds, so a snapshot
    taken from sacct alone could miss a job that was already queued and see it later.
    """
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%F"], capture_output=True, text=True,
                           check=True)
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-a", "-o", "JobID", "-S", "now-1days"],
                          capture_output=True, text=True, check=True)
    return set(queue.stdout.split()) | {j.split("_")[0] for j in acct.stdout.split()}


# ----------------------------------------------------------------------------------------------


def test_cluster_status_and_accounting(slurm_root):
    st = subprocess.run([str(DEV_CLUSTER), "status", "--root", str(slurm_root)], capture_output=True,
                        text=True, check=True)
    for daemon in ("munged", "mariadb", "slurmdbd", "slurmctld", "slurmd.sf1", "slurmd.sf2"):
        assert f"{daemon}: running" in st.stdout
    # two nodes, each with half the declared CPUs, both at the address Slurm records (NodeAddr)
    nodes = [line.split() for line in st.stdout.splitlines() if line.startswith("node: ")]
    assert [(n[1], n[2], n[4]) for n in nodes] == [("sf1", "idle", "NodeAddr=127.0.0.1"),
                                                   ("sf2", "idle", "NodeAddr=127.0.0.2")]
    assert nodes[0][3] == nodes[1][3]
    ports = [int(line.split("Port=")[1].split()[0]) for line in
             (slurm_root / "etc" / "slurm.conf").read_text().splitlines() if line.startswith("NodeName=")]
    base = int((slurm_root / "etc" / "port-base").read_text())
    assert ports == [base + 4, base + 5]
    # bad node counts: one line each, the running cluster untouched
    for bad, word in (("0", "positive integer"), (str(len(os.sched_getaffinity(0)) + 1), "cores"),
                      ("1", "stop it (down) before changing --nodes")):
        out = subprocess.run([str(DEV_CLUSTER), "up", "--nodes", bad, "--root", str(slurm_root)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and word in out.stderr and len(out.stderr.splitlines()) == 1
    # srun over both nodes: node ids and node-local ranks from Slurm
    srun = subprocess.run(["srun", "-N2", "--ntasks-per-node=2", "bash", "-c",
                           "echo $SLURM_PROCID $SLURM_NODEID $SLURM_LOCALID $SLURMD_NODENAME"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert sorted(srun.stdout.split("\n")[:-1]) == ["0 0 0 sf1", "1 0 1 sf1", "2 1 0 sf2", "3 1 1 sf2"]
    # a job whose first node is sf2 meets at sf2's recorded address, not at its name (which does
    # not resolve) nor at the address srun was started from
    code = ("import os; from scaleforge.orchestrator.run.executors.slurm_task import rendezvous_address; "
            "print(rendezvous_address(dict(os.environ)), os.environ['SLURM_LAUNCH_NODE_IPADDR'])")
    rdv = subprocess.run(["srun", "-N1", "-w", "sf2", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60, check=True)
    assert rdv.stdout.split() == ["127.0.0.2", "127.0.0.1"]
    assert subprocess.run(["getent", "hosts", "sf2"], capture_output=True).returncode != 0
    # `up` on a running cluster changes nothing and prints the same export line
    again = subprocess.run([str(DEV_CLUSTER), "up", "--root", str(slurm_root)], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == f"export SLURM_CONF={slurm_root}/etc/slurm.conf"
    # accounting answers (without it submitit cannot tell a killed job from a running one)
    assert subprocess.run(["sacct", "-n", "-X"], capture_output=True).returncode == 0
    # a job asking for more CPUs than the node has fails at once instead of pending forever
    big = subprocess.run(["sbatch", "-c", "1000", "-o", "/dev/null", "--wrap", "true"],
                         capture_output=True, text=True)
    assert big.returncode != 0 and "processors" in big.stderr.lower()


def test_unsafe_inputs_rejected_before_sbatch(slurm_root, tmp_path):
    with pytest.raises(ConfigError, match="partition"):
        slurm_ex.SlurmOptions(partition="debug; touch PWNED")
    with pytest.raises(ConfigError, match="account"):
        slurm_ex.SlurmOptions(account="a b")
    e = entries_from_specs([("ok", tiny_spec("ok"))], tmp_path / "100%done")[0]
    with pytest.raises(ConfigError, match="'%'"):
        slurm_ex.check_submittable([e], has_gpus=False)
    # a GPU run on a cluster without gpu gres is refused with what to change
    gpu = RunEntry(name="g", spec=tiny_spec("g"), run_dir=tmp_path / "g", gpus_per_node=1)
    with pytest.raises(ConfigError, match="no gpu gres"):
        slurm_ex.submit_slurm([gpu])
    assert not (tmp_path / "g").exists()  # nothing written for a refused submission
    # more ranks than the node has CPUs: sbatch refuses at once, in one line, nothing is recorded
    (big,) = entries_from_specs([("big", tiny_spec("big", dp=64))], tmp_path / "runs")
    with pytest.raises(runs.SchedulerError, match="sbatch refused run big: .*processors"):
        slurm_ex.submit_slurm([big], slurm_ex.SlurmOptions(array=False), echo=lambda _m: None)
    assert runs.read_job(big.run_dir) is None


def _trainer_started(run_dir: Path) -> bool:
    """A trainer process of `run_dir` exists (`python -m scaleforge.pretrain RUN_DIR/run.yaml ...`)."""
    import psutil

    spec = str(rundir.spec_path(run_dir))
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "scaleforge.pretrain" in cmdline and spec in cmdline:
            return True
    return False


def test_ladder_preempt_requeue_resume(slurm_root, tmp_path, tiny_store, client_path):
    """A two-run ladder through submitit in a directory whose path holds spaces, quotes and `;`:
    the two-rank run (one srun task per rank) is sent USR2 mid-run, both ranks save, its
    continuation job resumes it without scontrol, and it ends with exactly the losses of an
    uninterrupted local two-rank run; the one-rank run is sent USR2 during start-up and still saves
    and resumes; `status` shows the states and a second submit queues nothing."""
    hostile = tmp_path / "ladder it's \"q\"; touch PWNED $(touch PWNED2)"
    hostile.mkdir()
    steps = 16
    specs = [tiny_spec("a", seed=1, steps=steps, store=tiny_store),
             tiny_spec("b", seed=2, steps=steps, store=tiny_store, dp=2)]
    assert specs[1].checkpoint.every == 5
    plan = write_plan(hostile / "plan.yaml", specs)
    env = _env(client_path)
    a, b = entries_from_plan(plan)
    assert (a.ranks, b.ranks) == (1, 2)

    sub = _orchestrate("submit", str(plan), "--executor", "slurm", "--max-requeues", "2",
                       env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr + sub.stdout
    rec_a, rec_b = runs.read_job(a.run_dir), runs.read_job(b.run_dir)
    assert len(rec_b.job_ids) == 3

    # the uninterrupted reference: the same two ranks under torchrun on this machine
    ref = subprocess.Popen([sys.executable, "-m", "scaleforge.cli", "train", str(b.spec_path),
                            "--out", str(tmp_path / "reference"), "--nproc", "2"], env=_env(),
                           cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # a is signalled while its trainer is still starting (importing torch and megatron): the
    # signal is held until the trainer's handler exists, so it saves after its first step. Sent
    # once the trainer process exists (the job task started it with the signals blocked), not after
    # a fixed delay: under load the job task itself may still be starting then, before any handler.
    _wait(lambda: _trainer_started(a.run_dir), 120, "run a's trainer to start", 0.05)
    assert not (a.run_dir / "status.json").exists()
    subprocess.run(["scancel", "--signal=USR2", rec_a.job_ids[0]], check=True, env=env)

    metrics_b = b.run_dir / "metrics.jsonl"
    _wait(lambda: metrics_b.exists() and len(_losses(metrics_b)) >= 3, 300, "run b's third step")
    rows = {r["run"]: r for r in map(json.loads, _orchestrate(
        "status", str(plan), "--json", env=env, cwd=tmp_path).stdout.splitlines())}
    assert (rows["b"]["state"], rows["b"]["job"]) == ("running", rec_b.job_ids[0])
    subprocess.run(["scancel", "--signal=USR2", rec_b.job_ids[0]], check=True, env=env)

    def done() -> bool:
        return all(runs.read_run_dir(e.run_dir).status.get("state") == "completed" for e in (a, b))

    _wait(done, 400, "both runs to complete", poll=1.0)
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-2000:]

    # b saved mid-run, its first job ended failed, the first continuation resumed and finished
    states = _wait(lambda: (s := _sacct(rec_b.job_ids)) and s.get(rec_b.job_ids[2]) == "CANCELLED"
                   and s, 60, "the unused continuation to be cancelled")
    assert [states[j] for j in rec_b.job_ids] == ["FAILED", "COMPLETED", "CANCELLED"]
    submitit_log = (b.run_dir.parent / ".slurm" / f"{rec_b.job_ids[0]}_0_log.out").read_text()
    stopped = [line for line in submitit_log.splitlines() if "RunStopped:" in line]
    assert stopped and "(signals: SIGUSR2)" in stopped[-1], submitit_log[-3000:]
    saved_step = int(stopped[-1].split("saved at step ")[1].split()[0])
    assert 3 <= saved_step < steps
    # one log per rank and job: both ranks ran as srun tasks in both jobs
    logs = sorted(p.name for p in (b.run_dir / "logs").iterdir())
    assert logs == sorted(f"slurm-{j}.rank{r}.log" for j in rec_b.job_ids[:2] for r in (0, 1))
    resumed_log = (b.run_dir / "logs" / f"slurm-{rec_b.job_ids[1]}.rank0.log").read_text()
    assert f"step {saved_step + 1}/{steps}" in resumed_log
    assert f"step {saved_step}/{steps}" not in resumed_log
    # a, signalled during start-up, saved after its first step and resumed in its continuation
    assert [_sacct(rec_a.job_ids).get(j) for j in rec_a.job_ids] == \
        ["FAILED", "COMPLETED", "CANCELLED"]
    log_a = (a.run_dir.parent / ".slurm" / f"{rec_a.job_ids[0]}_0_log.out").read_text()
    assert "saved at step 1 and stopped (signals: SIGUSR2)" in log_a, log_a[-3000:]
    assert len(_losses(a.run_dir / "metrics.jsonl")) == steps

    # bit-identical continuation
    assert len(_losses(metrics_b)) == steps
    assert _losses(metrics_b) == _losses(tmp_path / "reference" / "metrics.jsonl")

    rows = {r["run"]: r for r in map(json.loads, _orchestrate(
        "status", str(plan), "--json", env=env, cwd=tmp_path).stdout.splitlines())}
    assert {n: (r["state"], r["step"], r["total_steps"]) for n, r in rows.items()} == {
        "a": ("completed", steps, steps), "b": ("completed", steps, steps), "target": ("new", 0, steps)}
    table = _orchestrate("status", str(plan), env=env, cwd=tmp_path)
    assert table.returncode == 0 and "completed" in table.stdout and "target" in table.stdout

    before = _all_jobs()
    again = _orchestrate("submit", str(plan), "--executor", "slurm", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "b: skip (completed)" in again.stdout and "nothing to launch" in again.stdout
    assert _all_jobs() == before  # nothing queued

    # the hostile directory name reached sbatch, srun and the jobs as data, never as shell code
    for stray in ("PWNED", "PWNED2"):
        assert not (tmp_path / stray).exists() and not (REPO / stray).exists()
        assert not list(hostile.glob(stray))


def test_array_task_resumes_while_its_array_runs(slurm_root, tmp_path, tiny_store, client_path):
    """Two runs of one shape in one array with a continuation array (`aftercorr`): `short` is
    preempted while `long` is paused (SIGSTOP through Slurm: its task is STOPPED, not ended);
    short's continuation task resumes it and it completes before long moves on, with exactly
    long's losses (the same spec under another name), and long then completes too."""
    steps = 12
    specs = [tiny_spec("short", steps=steps, store=tiny_store),
             tiny_spec("long", steps=steps, store=tiny_store)]
    plan = write_plan(tmp_path / "plan.yaml", specs)
    env = _env(client_path)
    short, long = entries_from_plan(plan)
    sub = _orchestrate("submit", str(plan), "--executor", "slurm", "--max-requeues", "1",
                       env=env, cwd=tmp_path)
    assert sub.returncode == 0, sub.stderr + sub.stdout
    rec_s, rec_l = runs.read_job(short.run_dir), runs.read_job(long.run_dir)
    assert len({j.split("_")[0] for j in rec_s.job_ids + rec_l.job_ids}) == 2  # two arrays

    # long runs its first step, then is stopped whole (task and trainer) while Slurm says RUNNING
    _wait(lambda: len(_losses_if(long.run_dir)) >= 1, 300, "long's first step", 0.2)
    subprocess.run(["scancel", "--signal=STOP", rec_l.job_ids[0]], check=True, env=env)
    _wait(lambda: len(_losses_if(short.run_dir)) >= 3, 300, "short's third step", 0.2)
    subprocess.run(["scancel", "--signal=USR2", rec_s.job_ids[0]], check=True, env=env)
    try:
        _wait(lambda: runs.read_run_dir(short.run_dir).status.get("state") == "completed", 300,
              "short to complete in its continuation task")
        assert _squeue_state(rec_l.job_ids[0]) == "STOPPED"  # its array has not ended
    finally:
        subprocess.run(["scancel", "--signal=CONT", rec_l.job_ids[0]], check=True, env=env)
    _wait(lambda: runs.read_run_dir(long.run_dir).status.get("state") == "completed", 300,
          "long to complete", 0.5)
    states = _wait(lambda: (s := _sacct(rec_s.job_ids + rec_l.job_ids))
                   and all(s.get(j) == "COMPLETED" for j in rec_s.job_ids + rec_l.job_ids) and s,
                   120, "every task to end COMPLETED")
    assert states  # short's first task saved, stopped and ended well: that started its continuation
    resumed = (short.run_dir / "logs" / f"slurm-{rec_s.job_ids[1]}.rank0.log").read_text()
    assert "step 1/" not in resumed and f"step {steps}/{steps}" in resumed, resumed[-2000:]
    assert _losses(short.run_dir / "metrics.jsonl") == _losses(long.run_dir / "metrics.jsonl")
    assert len(_losses(short.run_dir / "metrics.jsonl")) == steps


def _losses_if(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    return _losses(path) if path.exists() else []


def test_second_submit_while_queued_queues_nothing(slurm_root, tmp_path, tiny_store, client_path):
    """Runs whose jobs are still pending are not queued again (the recorded job is asked for)."""
    # every CPU of both nodes taken, so the runs stay pending
    hold = subprocess.run(["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "-c", "8", "-o",
                           "/dev/null", "--wrap", "sleep 60"], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        plan = write_plan(tmp_path / "plan.yaml", [tiny_spec("q", steps=2, store=tiny_store),
                                                   tiny_spec("r", steps=2, store=tiny_store)])
        env = _env(client_path)
        first = _orchestrate("submit", str(plan), "--executor", "slurm", "--max-requeues", "0",
                             env=env, cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        e, e2 = entries_from_plan(plan)
        jid, jid2 = runs.read_job(e.run_dir).job_ids[0], runs.read_job(e2.run_dir).job_ids[0]
        # same-shaped runs form one array: one job id, one task each
        base = jid.split("_")[0]
        assert (jid, jid2) == (f"{base}_0", f"{base}_1")
        before = _all_jobs()
        second = _orchestrate("submit", str(plan), "--executor", "slurm", env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        assert f"q: skip (queued, job {jid} PENDING)" in second.stdout
        assert _all_jobs() == before
        row = json.loads(_orchestrate("status", str(plan), "--json", env=env, cwd=tmp_path).stdout
                         .splitlines()[0])
        assert (row["state"], row["job_state"]) == ("queued", "PENDING")
        subprocess.run(["scancel", base], check=True)
        # cancelled before it ran: `submit` starts it again
        _wait(lambda: _sacct([jid]).get(jid) == "CANCELLED", 30, "the cancellation")
        dry = _orchestrate("submit", str(plan), "--executor", "slurm", "--dry-run", env=env,
                           cwd=tmp_path)
        assert "q: start (failed, job " in dry.stdout and "would submit array of 2: q, r" in dry.stdout
    finally:
        subprocess.run(["scancel", hold], check=False)
