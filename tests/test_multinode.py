"""Two Slurm nodes on one machine (the session's dev cluster: sf1, sf2, names that resolve to no
address): multi-node runs through `orchestrate submit --executor slurm` (submitit) and the plain
sbatch example, a preempted 2-node run, a node lost mid-run, and a 200-run ladder under load.

Every 2-node run spans both nodes, one srun task per rank, rendezvous at the first node's NodeAddr.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaleforge import rundir
from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import entries_from_plan
from slurm_cluster import DEV_CLUSTER, REPO, cluster_nodes, wait_for
from test_runs import tiny_spec, write_plan

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 20  # checkpoints every 5 steps (tiny_spec): the node-loss run dies between two of them
CLIENTS = ("sbatch", "squeue", "sacct", "sinfo", "scancel", "srun")


def _env(**extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default",
           "SCALEFORGE_RETRY_BACKOFF_S": "0.2,0.4"}
    env.update(extra)
    return env


def _orchestrate(*args, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleforge.cli", *map(str, args)],
                          capture_output=True, text=True, env=env or _env(), timeout=timeout)




def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_metrics(run_dir) if "loss" in r]


def _state(run_dir: Path) -> str | None:
    return rundir.read_status(run_dir).get("state")


def _rows(plan: Path, env: dict | None = None) -> dict[str, dict]:
    out = _orchestrate("status", plan, "--json", env=env)
    assert out.returncode == 0, out.stderr
    return {r["run"]: r for r in map(json.loads, out.stdout.splitlines())}


def _shim(folder: Path, log: Path | None = None, failing: dict[str, str] | None = None,
          missing: tuple[str, ...] = ()) -> str:
    """A PATH whose Slurm client commands log each call to `log` (then run the real command), fail
    with the given message, or are absent."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CLIENTS:
        if name in missing:
            continue
        path = folder / name
        if failing and name in failing:
            path.write_text(f"#!/bin/sh\necho '{failing[name]}' >&2\nexit 1\n")
        else:
            record = f"echo {name} >> '{log}'\n" if log else ""
            path.write_text(f"#!/bin/sh\n{record}exec {shutil.which(name)} \"$@\"\n")
        path.chmod(0o755)
    return f"{folder}:{Path(sys.executable).parent}"


def _active(job_ids) -> bool:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(job_ids)],
                         capture_output=True, text=True)  # squeue's default: pending/running only
    return bool(out.stdout.split())


def _rank_logs(run_dir: Path, job: str) -> dict[int, str]:
    return {int(p.name.rsplit("rank", 1)[1].split(".")[0]): p.read_text()
            for p in rundir.log_dir(run_dir).glob(f"slurm-{job}.rank*.log")}


@pytest.fixture(scope="module")
def two_nodes(slurm_root):
    if cluster_nodes() < 2:
        pytest.skip("two dev-cluster nodes need two cores")
    return slurm_root


@pytest.fixture(scope="module")
def trained(two_nodes, tmp_path_factory, tiny_store):
    """A DP=2 run (1 rank on each node) and a TP=2 x DP=2 run (2 ranks on each node, TP inside a
    node) through submitit; the DP=2 spec again through the plain sbatch example; the DP=2 spec as
    `pre`, sent USR2 on both nodes once its ranks run; the single-process reference."""
    root = tmp_path_factory.mktemp("multinode")
    specs = [tiny_spec("dp2", steps=STEPS, store=tiny_store, dp=2),
             tiny_spec("tp2dp2", steps=STEPS, store=tiny_store, dp=2, tp=2),
             tiny_spec("pre", steps=STEPS, store=tiny_store, dp=2)]
    plan = write_plan(root / "plan.yaml", specs, nodes={"dp2": 2, "tp2dp2": 2, "pre": 2})
    entries = {e.name: e for e in entries_from_plan(plan)}
    assert [(e.nodes, e.ranks_per_node) for e in entries.values()] == [(2, 1), (2, 2), (2, 1)]
    t0 = time.perf_counter()
    sub = _orchestrate("submit", plan, "--executor", "slurm", "--no-array", "--max-requeues", "1")
    assert sub.returncode == 0, sub.stderr + sub.stdout
    sbatch_dir = root / "sbatch-run"
    sbatch = subprocess.run(
        ["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "-o", str(root / "sbatch-%j.out"),
         f"--export=ALL,RUN_YAML={entries['dp2'].spec_path},RUN_DIR={sbatch_dir},"
         f"PYTHON={sys.executable},MAX_RESUBMITS=0,OMP_NUM_THREADS=1",
         str(REPO / "slurm" / "sbatch-example.sh")], capture_output=True, text=True, check=True)
    ref = subprocess.Popen([sys.executable, "-m", "scaleforge.cli", "train",
                            str(entries["dp2"].spec_path), "--out", str(root / "ref"), "--nproc", "1"],
                           env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pre = entries["pre"]
    first = runs.read_job(pre.run_dir).job_ids[0]
    # both ranks' tasks have their handlers (their logs exist): USR2 to every rank on both nodes
    wait_for(lambda: len(_rank_logs(pre.run_dir, first)) == 2, 300, "pre's two ranks to start")
    subprocess.run(["scancel", "--signal=USR2", first], check=True)
    done = [e.run_dir for e in entries.values()] + [sbatch_dir]
    wait_for(lambda: all(_state(d) == "completed" for d in done), 600, "the runs to complete", poll=1.0)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    print(f"multi-node runs done in {time.perf_counter() - t0:.0f} s")
    return {"root": root, "plan": plan, "entries": entries, "sbatch_dir": sbatch_dir,
            "sbatch_job": sbatch.stdout.strip(), "ref": _losses(root / "ref")}


def test_multinode_parity(trained):
    """DP=2 over two nodes and TP=2 x DP=2 over two nodes equal the single process within 1e-5;
    the ranks ran on both nodes with Slurm's node-local ranks and the first node's NodeAddr."""
    ref = trained["ref"]
    assert len(ref) == STEPS
    for name in ("dp2", "tp2dp2"):
        run_dir = trained["entries"][name].run_dir
        got = _losses(run_dir)
        diff = max(abs(a - b) for a, b in zip(got, ref))
        print(f"{name}: max |loss - single process| = {diff:.2e} over {STEPS} steps")
        assert len(got) == STEPS and diff <= 1e-5
        job = runs.read_job(run_dir).job_ids[0]
        heads = {r: log.splitlines()[0] for r, log in _rank_logs(run_dir, job).items()}
        per_node = 1 if name == "dp2" else 2
        for rank, head in heads.items():
            node, local = f"sf{rank // per_node + 1}", rank % per_node
            assert f"node {node} local rank {local} rendezvous 127.0.0.1 " in head, head
        assert len(heads) == 2 * per_node
    # the plain sbatch example: the same two ranks, the same losses
    sb = _losses(trained["sbatch_dir"])
    assert max(abs(a - b) for a, b in zip(sb, ref)) <= 1e-5 and len(sb) == STEPS
    assert sb == _losses(trained["entries"]["dp2"].run_dir)


def test_multinode_preemption_continues(trained):
    """`pre`, sent USR2 on both nodes, saved, its continuation job resumed it, and it ended with
    the uninterrupted DP=2 run's losses, bit for bit."""
    pre = trained["entries"]["pre"]
    first, cont = runs.read_job(pre.run_dir).job_ids
    logs = _rank_logs(pre.run_dir, cont)
    assert sorted(logs) == [0, 1] and "node sf2 local rank 0" in logs[1].splitlines()[0]
    assert _losses(pre.run_dir) == _losses(trained["entries"]["dp2"].run_dir)
    submitit_log = (pre.run_dir.parent / ".slurm" / f"{first}_0_log.out").read_text()
    assert "saved at step" in submitit_log and "SIGUSR2" in submitit_log, submitit_log[-2000:]


def _kill_node(root: Path, node: str, job: str) -> list[int]:
    """SIGKILL the node's slurmd, and the job's processes on that node (its ranks and their
    slurmstepd): the node is lost as a machine would be."""
    slurmd = int((root / "run" / f"slurmd.{node}.pid").read_text().strip())
    victims = {slurmd}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURMD_NODENAME={node}".encode() in env and f"SLURM_JOB_ID={job}".encode() in env:
            victims.add(int(proc.name))
            try:  # the task's slurmstepd
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if Path(f"/proc/{ppid}/comm").read_text().strip() == "slurmstepd":
                    victims.add(ppid)
            except (OSError, ValueError):
                pass
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(victims)


def test_node_lost_mid_run(trained, two_nodes):
    """One node's slurmd and ranks are killed mid-run: the survivor does not hang, `status` says
    so at its first poll, `submit` resumes from the last complete checkpoint after the node is
    back, and the run ends with the uninterrupted run's losses; every checkpoint left verifies."""
    from scaleforge.pretrain import checkpoint

    root = trained["root"] / "lost"
    root.mkdir()
    spec = tiny_spec("lost", steps=STEPS, store=trained["entries"]["dp2"].spec.data.stores[0], dp=2)
    plan = write_plan(root / "plan.yaml", [spec], nodes={"lost": 2})
    (e,) = entries_from_plan(plan)
    sub = _orchestrate("submit", plan, "--executor", "slurm", "--max-requeues", "0")
    assert sub.returncode == 0, sub.stderr
    job = runs.read_job(e.run_dir).job_ids[0]
    wait_for(lambda: rundir.latest_checkpoint(e.run_dir) and rundir.read_run_dir(e.run_dir).step >= 6,
                 300, "a checkpoint and step 6", poll=0.1)
    t0 = time.perf_counter()
    victims = _kill_node(two_nodes, "sf2", job)
    assert len(victims) >= 3  # slurmd, the rank's task, its trainer
    # the surviving rank fails on its next collective instead of waiting out gloo's 30 minutes
    wait_for(lambda: _state(e.run_dir) == "failed", 120, "the surviving rank to fail", poll=0.2)
    survived_s = time.perf_counter() - t0
    row = _rows(plan)["lost"]  # one poll
    print(f"node lost: survivor failed after {survived_s:.1f} s; status: {row['state']} "
          f"job {row['job']} {row['job_state']}")
    assert row["state"] == "failed" and survived_s < 60
    died_at = rundir.last_train_line(e.run_dir)[0]
    assert 6 <= died_at < STEPS
    # the node comes back; the job (failed, or requeued by Slurm and returning at once) goes
    up = subprocess.run([str(DEV_CLUSTER), "up", "--root", str(two_nodes)], capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    wait_for(lambda: not _active([job]), 180, "the lost job to end", poll=1.0)
    saved = rundir.latest_checkpoint(e.run_dir)
    checkpoint.verify(rundir.checkpoints_dir(e.run_dir) / saved)
    again = _orchestrate("submit", plan, "--executor", "slurm", "--max-requeues", "0")
    assert again.returncode == 0, again.stderr
    resumed_from = rundir.parse_step(saved)
    assert f"lost: resume from {saved} (failed, job {job} " in again.stdout, again.stdout
    assert resumed_from <= died_at
    wait_for(lambda: _state(e.run_dir) == "completed", 300, "the resumed run", poll=1.0)
    assert _losses(e.run_dir) == _losses(trained["entries"]["dp2"].run_dir)
    new_job = runs.read_job(e.run_dir).job_ids[0]
    assert new_job != job
    log = _rank_logs(e.run_dir, new_job)[0]  # resumed from the checkpoint, not restarted
    assert f"step {resumed_from + 1}/{STEPS}" in log and f"step {resumed_from}/{STEPS}" not in log
    for step_dir in rundir.checkpoints_dir(e.run_dir).glob(f"{rundir.STEP_PREFIX}*"):
        checkpoint.verify(step_dir)


def test_ladder_of_200_under_load(two_nodes, tmp_path):
    """200 tiny runs: two sbatch calls (an array and its continuation array, throttled), held; a
    second `submit` started while the first is still submitting queues nothing; `status` answers
    from the run directories first and asks the scheduler at most twice (one squeue, one sacct)."""
    specs = [tiny_spec(f"r{i:03d}", steps=2, seed=i) for i in range(200)]
    plan = write_plan(tmp_path / "plan.yaml", specs)
    calls = tmp_path / "calls.log"
    env = _env(PATH=_shim(tmp_path / "bin", calls))
    args = ("submit", plan, "--executor", "slurm", "--hold", "--throttle", "8", "--max-requeues", "1")
    first = subprocess.Popen([sys.executable, "-m", "scaleforge.cli", *map(str, args)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # the first holds the runs directory's submit lock by now
    second = _orchestrate(*args, env=env)
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, err1 + second.stderr
    assert calls.read_text().split().count("sbatch") == 2
    assert "nothing to launch" in second.stdout and "r199: skip (queued" in second.stdout
    entries = entries_from_plan(plan)
    records = [runs.read_job(e.run_dir) for e in entries]
    arrays = {j.split("_")[0] for r in records for j in r.job_ids}
    assert len(arrays) == 2 and all(len(r.job_ids) == 2 for r in records)
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(sorted(arrays))],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(queue) == 400 and all("|PENDING|" in q for q in queue)
    throttle = subprocess.run(["squeue", "-h", "-o", "%i", "-j", min(arrays)], capture_output=True,
                              text=True, check=True).stdout
    assert "%8" in throttle
    try:
        # 50 runs finished meanwhile (their directories say so): answered without the scheduler
        for e in entries[:50]:
            rundir.write_status(e.run_dir, {"state": "completed", "step": 2, "total_steps": 2})
        calls.write_text("")
        t0 = time.perf_counter()
        rows = _rows(plan, env)
        poll_s = time.perf_counter() - t0
        asked = calls.read_text().split()
        print(f"status over 200 runs: {len(asked)} scheduler calls ({', '.join(asked)}), "
              f"{poll_s:.2f} s")
        assert asked.count("squeue") == 1 and asked.count("sacct") <= 1 and len(asked) <= 2
        states = [rows[e.name]["state"] for e in entries]
        assert states[:50] == ["completed"] * 50 and states[50:] == ["queued"] * 150
        # the controller not answering: unknown, never dead; `status` exits 0, `submit` retries
        # and then launches nothing
        down = _env(PATH=_shim(tmp_path / "down", failing={
            "squeue": "squeue: error: slurm_load_jobs error: Unable to contact slurm controller "
                      "(connect failure)"}))
        rows = _rows(plan, down)
        assert [rows[e.name]["state"] for e in entries] == ["completed"] * 50 + ["unknown"] * 150
        retried = _orchestrate("submit", plan, "--executor", "slurm", env=down)
        assert retried.returncode != 0 and len(retried.stderr.strip().splitlines()) == 1
        assert "failed 3 times" in retried.stderr and "Unable to contact" in retried.stderr
        assert [runs.read_job(e.run_dir) for e in entries] == records  # nothing new recorded
    finally:
        subprocess.run(["scancel", *sorted(arrays)], check=False)


def test_bad_input_refused_before_anything_is_recorded(two_nodes, tmp_path):
    """More nodes than the cluster has, sbatch missing, sbatch failing: one line each, retried
    where retrying can help, and no run recorded as submitted."""
    plan = write_plan(tmp_path / "plan.yaml", [tiny_spec("wide", steps=2, dp=3)], nodes={"wide": 3})
    out = _orchestrate("submit", plan, "--executor", "slurm")
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1
    assert "run wide needs 3 nodes but the default partition has 2" in out.stderr
    assert not (tmp_path / "runs").exists()

    plan = write_plan(tmp_path / "p2.yaml", [tiny_spec("one", steps=2)], runs_dir="runs2")
    (e,) = entries_from_plan(plan)
    for label, path in (
        ("missing", _shim(tmp_path / "nosbatch", missing=("sbatch",))),
        ("failing", _shim(tmp_path / "badsbatch", failing={"sbatch": "sbatch: error: Batch job "
                          "submission failed: Unable to contact slurm controller (connect failure)"})),
    ):
        out = _orchestrate("submit", plan, "--executor", "slurm", env=_env(PATH=path))
        assert out.returncode != 0, label
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "sbatch failed 3 times" in out.stderr and out.stdout.count("retrying in") == 2
        assert runs.read_job(e.run_dir) is None  # nothing recorded as submitted


def test_growth_stage_queued_after_its_source(two_nodes, tmp_path):
    """A run whose checkpoint.init_from names another run of the plan is queued with
    --dependency=afterok on its source's jobs (any of its chain), submitted held: nothing trains."""
    from dataclasses import replace

    from scaleforge.config import run_id

    first = tiny_spec("g0", steps=2)
    second = tiny_spec("g1", steps=2, seed=5)
    second = replace(second, checkpoint=replace(second.checkpoint,
                                                init_from=f"../g0-{run_id(first)}"))
    plan = write_plan(tmp_path / "plan.yaml", [first, second])
    dry = _orchestrate("submit", plan, "--executor", "slurm", "--dry-run")
    assert "g1: start (new), waits for g0" in dry.stdout
    assert "would submit job of 1: g1 - " in dry.stdout and "after g0 completed" in dry.stdout
    out = _orchestrate("submit", plan, "--executor", "slurm", "--hold", "--max-requeues", "1")
    assert out.returncode == 0, out.stderr
    g0, g1 = entries_from_plan(plan)
    chain0, chain1 = runs.read_job(g0.run_dir).job_ids, runs.read_job(g1.run_dir).job_ids
    try:
        deps = subprocess.run(["squeue", "-h", "-o", "%i|%E", "-j", chain1[0]], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert deps.startswith(f"{chain1[0]}|afterok:{chain0[0]}")
        assert f"afterok:{chain0[1]}" in deps  # its source's continuation counts too
        rows = _rows(plan)
        assert rows["g1"]["waits_for"] == ["g0"] and rows["g1"]["state"] == "queued"
    finally:
        subprocess.run(["scancel", *chain0, *chain1], check=False)
