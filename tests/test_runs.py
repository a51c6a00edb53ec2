"""Run directories, states and idempotence (scaleforge.orchestrator.run.runs), without a scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from scaleforge.config import RunSpec, from_dict, run_id, to_dict
from scaleforge.errors import ConfigError
from scaleforge.orchestrator.plan import planfile
from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import RunEntry, entries_from_plan, entries_from_specs, prepare_run_dir
from scaleforge.orchestrator.plan.cluster import cpu_cluster
from scaleforge.orchestrator.run.executors import local
from scaleforge.orchestrator.run.executors import slurm_states


def tiny_spec(name: str, *, seed: int = 1234, steps: int = 20, store: str | Path = "bundled",
              dp: int = 1, tp: int = 1) -> RunSpec:
    """A few-second dense model (the trainer's smallest sensible shape)."""
    return from_dict(RunSpec, {
        "name": name, "seed": seed,
        "model": {"arch": "dense", "layers": 2, "hidden": 64, "heads": 2, "kv_heads": 2,
                  "ffn_hidden": 128, "vocab_size": 512},
        "data": {"stores": [str(store)], "seq_len": 32},
        "train": {"steps": steps, "global_batch": 4 * dp, "micro_batch": 2, "warmup_steps": 2},
        "parallel": {"dp": dp, "tp": tp},
        "checkpoint": {"every": 5}, "eval": {"every": 0},
    })


def write_plan(path: Path, specs: list[RunSpec], *, runs_dir: str = "runs",
               nodes: dict[str, int] | None = None) -> Path:
    """A plan.yaml whose ladder is `specs` (the last spec is also the target), as `plan` writes it;
    `nodes` gives the nodes of named runs (1 otherwise)."""

    def planned(spec: RunSpec, cls=planfile.PlannedRun, **extra):
        n = spec.model.num_params()
        d = spec.tokens_per_step * spec.train.steps
        return cls(name=spec.name, run_id=run_id(spec), budget=6.0 * n * d, N=n,
                   N_non_embedding=n, D=d, flops_per_token=6.0 * n, flops=6.0 * n * d,
                   epochs=0.1, gpus=spec.parallel.world_size, nodes=(nodes or {}).get(spec.name, 1),
                   gpu_hours=0.01, spec=spec,
                   **extra)

    target = replace(specs[-1], name="target", seed=99)
    plan = planfile.Plan(
        budget=1e12, arch="dense",
        law=planfile.LawInfo(name="chinchilla", params={"E": 1.69}, ci={}),
        cluster=cpu_cluster(2), seq_len=32, unique_tokens=1e6, runs_dir=runs_dir,
        ladder=tuple(planned(s) for s in specs),
        target=planned(target, planfile.TargetRun, loss=3.0),
    )
    planfile.save_plan(plan, path)
    return path


def entry(tmp_path: Path, name: str = "r1", **kw) -> RunEntry:
    return entries_from_specs([(name, tiny_spec(name, **kw))], tmp_path / "runs")[0]


def write_status(run_dir: Path, state: str, step: int, total: int = 20, loss: float = 3.5) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "status.json").write_text(json.dumps(
        {"state": state, "step": step, "total_steps": total, "run_id": "x", "last_loss": loss}))


def no_scheduler(cmd):
    raise AssertionError(f"the scheduler was asked: {cmd}")


# ----------------------------------------------------------------------------------------------


def test_run_dir_layout_and_identity(tmp_path):
    e = entry(tmp_path, "alpha")
    assert e.run_dir == tmp_path / "runs" / f"alpha-{run_id(e.spec)}"
    assert e.run_id == run_id(e.spec) and len(e.run_id) == 12
    # layout and checkpoint cadence are not identity: the same run under another layout
    spec2 = replace(e.spec, parallel=replace(e.spec.parallel, dp=2))
    (e2,) = entries_from_specs([("alpha", spec2)], tmp_path / "runs")
    assert e2.run_dir == e.run_dir and e2.ranks == 2
    # a different seed is a different run
    assert entry(tmp_path, "alpha", seed=7).run_dir != e.run_dir


def test_names_that_reach_the_shell_are_rejected(tmp_path):
    for bad in ("a b", "a'b", 'a"b', "a;b", "a$(id)", "-rf", "a/b", ""):
        with pytest.raises(ConfigError, match="not allowed"):
            tiny_spec(bad)


def test_entries_from_plan(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", [tiny_spec("s1"), tiny_spec("s2", seed=5)])
    entries = entries_from_plan(plan)
    assert [e.name for e in entries] == ["s1", "s2"]
    assert entries[0].run_dir == tmp_path / "runs" / f"s1-{run_id(tiny_spec('s1'))}"
    assert entries[0].gpus_per_node == 0  # a CPU cluster asks for no GPUs
    assert [e.name for e in entries_from_plan(plan, target=True)] == ["s1", "s2", "target"]
    assert [e.name for e in entries_from_plan(plan, only=["s2"])] == ["s2"]
    with pytest.raises(ConfigError, match="--only nope: no such run"):
        entries_from_plan(plan, only=["nope"])
    assert entries_from_plan(plan, time_min=7)[0].time_min == 7
    assert entries_from_plan(plan)[0].time_min == 12  # 2 x 0.6 min + 10 = 11.2, rounded up


def test_plan_with_edited_spec_is_refused(tmp_path):
    plan = write_plan(tmp_path / "plan.yaml", [tiny_spec("s1")])
    text = (tmp_path / "plan.yaml").read_text().replace("seed: 1234", "seed: 4321", 1)
    (tmp_path / "plan.yaml").write_text(text)
    with pytest.raises(ConfigError, match="hashes to"):
        entries_from_plan(plan)


def test_prepare_run_dir_refuses_another_run(tmp_path):
    e = entry(tmp_path)
    prepare_run_dir(e)
    assert from_dict(RunSpec, __import__("yaml").safe_load(e.spec_path.read_text())) == e.spec
    other = tiny_spec("r1", seed=77)
    e.spec_path.write_text(__import__("yaml").safe_dump(to_dict(other)))
    before = e.spec_path.read_text()
    with pytest.raises(ConfigError, match="move that directory away"):
        prepare_run_dir(e)
    assert e.spec_path.read_text() == before  # nothing overwritten


def test_read_run_dir(tmp_path):
    e = entry(tmp_path)
    assert runs.read_run_dir(e.run_dir) == runs.DirState()
    e.run_dir.mkdir(parents=True)
    lines = [{"step": s, "loss": 5.0 - s / 10} for s in (1, 2, 3)] + [{"step": 3, "eval_loss": 4.0}]
    (e.run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "lo')  # torn last line
    d = runs.read_run_dir(e.run_dir)
    assert (d.step, d.last_loss, d.latest_checkpoint) == (3, 4.7, None)
    (e.run_dir / "checkpoints" / "step_0000003").mkdir(parents=True)
    (e.run_dir / "checkpoints" / "latest").write_text("step_0000003\n")
    write_status(e.run_dir, "preempted", 3, loss=4.7)
    d = runs.read_run_dir(e.run_dir)
    assert (d.status["state"], d.step, d.total_steps, d.latest_checkpoint) == \
        ("preempted", 3, 20, "step_0000003")
    # `latest` naming a missing (half-published) checkpoint is not a checkpoint
    (e.run_dir / "checkpoints" / "latest").write_text("step_0000009\n")
    assert runs.read_run_dir(e.run_dir).latest_checkpoint is None


@pytest.mark.parametrize("written,state,action", [
    (None, "new", "start"),
    ("completed", "completed", "skip"),
    ("diverged", "diverged", "skip"),
    ("preempted", "preempted", "resume"),
    ("failed", "failed", "resume"),
    ("running", "interrupted", "resume"),  # status says running, but no job holds it
])
def test_states_from_run_dir_alone(tmp_path, written, state, action):
    e = entry(tmp_path)
    if written:
        write_status(e.run_dir, written, 8)
    (st,) = runs.run_states([e], runner=no_scheduler)
    assert (st.state, st.action) == (state, action)
    if written:
        assert (st.step, st.total_steps, st.last_loss) == (8, 20, 3.5)


def test_local_record_alive_and_gone(tmp_path):
    e = entry(tmp_path)
    prepare_run_dir(e)
    # this process is the recorded executor: the run is queued (not yet launched), then running
    runs.write_job(e.run_dir, local.local_record())
    (st,) = runs.run_states([e], runner=no_scheduler)
    assert (st.state, st.action, st.job) == ("queued", "skip", f"local:{os.getpid()}")
    runs.write_job(e.run_dir, local.local_record(attempts=1))
    write_status(e.run_dir, "running", 4)
    assert runs.run_states([e], runner=no_scheduler)[0].state == "running"
    # a finished executor process: the run was interrupted and is resumed
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = replace(local.local_record(attempts=1), pid=int(proc.stdout))
    runs.write_job(e.run_dir, dead)
    (st,) = runs.run_states([e], runner=no_scheduler)
    assert (st.state, st.action, st.job_state) == ("interrupted", "resume", "GONE")
    # a recycled pid (same number, another start time) is not the executor
    runs.write_job(e.run_dir, replace(local.local_record(attempts=1), pid_started=1.0))
    assert runs.run_states([e], runner=no_scheduler)[0].state == "interrupted"


def test_job_record_roundtrip_and_garbage(tmp_path):
    rec = runs.JobRecord(executor="slurm", job_ids=("12_3", "13"), submitted_at=5.0, host="h")
    runs.write_job(tmp_path, rec)
    assert runs.read_job(tmp_path) == rec
    (tmp_path / "job.json").write_text("{not json")
    assert runs.read_job(tmp_path) is None


def test_parse_slurm_tables():
    squeue = "7_[2-3,5%2]|PENDING\n6_1|RUNNING\n9|COMPLETING\n"
    assert slurm_states.parse_slurm_table(squeue) == {
        "7_2": "PENDING", "7_3": "PENDING", "7_5": "PENDING", "6_1": "RUNNING", "9": "COMPLETING"}
    sacct = "6_0|FAILED\n6_0.batch|FAILED\n12|CANCELLED by 0\n14|RUNNING\n"
    assert slurm_states.parse_slurm_table(sacct) == {"6_0": "FAILED", "12": "CANCELLED", "14": "RUNNING"}


class Counting:
    """A stand-in for squeue/sacct that answers from a table and counts the calls."""

    def __init__(self, squeue: str, sacct: str | None):
        self.squeue, self.sacct, self.calls = squeue, sacct, []

    def __call__(self, cmd):
        self.calls.append(cmd[0])
        if cmd[0] == "squeue":
            return subprocess.CompletedProcess(cmd, 0, self.squeue, "")
        if self.sacct is None:
            return subprocess.CompletedProcess(cmd, 1, "", "Slurm accounting storage is disabled")
        if self.sacct == "down":
            return subprocess.CompletedProcess(cmd, 1, "", "sacct: error: Problem talking to the "
                                                           "database: Connection refused")
        return subprocess.CompletedProcess(cmd, 0, self.sacct, "")


def test_slurm_states_batched_and_tolerant(tmp_path, monkeypatch):
    now = 10_000.0
    entries = [entry(tmp_path, f"r{i}") for i in range(6)]
    chains = [("11", "12"), ("21", "22"), ("31",), ("41", "42"), ("51",), ("61",)]
    for e, ids in zip(entries, chains):
        prepare_run_dir(e)
        runs.write_job(e.run_dir, runs.JobRecord(executor="slurm", job_ids=ids, submitted_at=now - 600))
    write_status(entries[0].run_dir, "completed", 20)    # finished: the scheduler is not asked about it
    write_status(entries[1].run_dir, "preempted", 8)     # 21 failed, continuation 22 pending
    write_status(entries[2].run_dir, "running", 3)       # 31 running
    write_status(entries[3].run_dir, "running", 5)       # 41 timed out hard, 42 cancelled: interrupted
    # entries[4]: 51 vanished from squeue and sacct (purged) long ago: gone, never trained -> failed
    runs.write_job(entries[5].run_dir, runs.JobRecord(executor="slurm", job_ids=("61",),
                                                      submitted_at=now - 5))  # just submitted
    sched = Counting("22|PENDING\n31|RUNNING\n", "21|FAILED\n41|TIMEOUT\n42|CANCELLED by 0\n")
    states = runs.run_states(entries, runner=sched, now=now)
    assert sched.calls == ["squeue", "sacct"]  # one call each, for all runs
    got = [(s.state, s.action, s.job_state) for s in states]
    assert got == [
        ("completed", "skip", ""),
        ("queued", "skip", "PENDING"),
        ("running", "skip", "RUNNING"),
        ("interrupted", "resume", "TIMEOUT"),  # its cancelled continuation says nothing new
        ("failed", "start", "GONE"),
        ("queued", "skip", "SUBMITTED"),  # accounting lag: not yet visible, still counts as queued
    ]
    # accounting disabled: squeue's answer stands, the rest is decided from the run directories
    sched = Counting("22|PENDING\n31|RUNNING\n", None)
    states = runs.run_states(entries, runner=sched, now=now)
    assert [s.state for s in states] == \
        ["completed", "queued", "running", "interrupted", "failed", "queued"]
    # slurmdbd down: a chain squeue no longer holds is unknown, never taken for dead
    sched = Counting("22|PENDING\n31|RUNNING\n", "down")
    states = runs.run_states(entries, runner=sched, now=now, tolerant=True)
    assert sched.calls == ["squeue", "sacct"]
    assert [s.state for s in states] == \
        ["completed", "queued", "running", "unknown", "unknown", "unknown"]
    assert "Connection refused" in states[3].why and states[3].action == "skip"
    with pytest.raises(runs.SchedulerError, match="state of run r3 is unknown .*Connection refused"):
        runs.run_states(entries, runner=sched, now=now)


def test_scheduler_down(tmp_path, monkeypatch):
    e = entry(tmp_path)
    prepare_run_dir(e)
    runs.write_job(e.run_dir, runs.JobRecord(executor="slurm", job_ids=("5",), submitted_at=time.time()))

    def down(cmd):
        return subprocess.CompletedProcess(cmd, 1, "", "slurm_load_jobs error: Unable to contact slurm controller")

    with pytest.raises(runs.SchedulerError, match="Unable to contact"):
        runs.run_states([e], runner=down)  # submit must not guess
    assert runs.run_states([e], runner=down, tolerant=True)[0].state == "unknown"  # status shows it
    assert runs.run_states([e], runner=down, tolerant=True)[0].action == "skip"


def test_wait_for_runs(tmp_path):
    import threading

    e = entry(tmp_path)
    prepare_run_dir(e)
    rec = local.local_record(attempts=1)
    runs.write_job(e.run_dir, rec)
    write_status(e.run_dir, "running", 3)

    def finish():
        write_status(e.run_dir, "completed", 20)
        runs.write_job(e.run_dir, replace(rec, ended_at=time.time(), exit_code=0))

    timer = threading.Timer(0.3, finish)
    timer.start()
    lines = []
    (st,) = runs.wait_for_runs([e], poll_s=0.05, timeout_s=10, echo=lines.append, runner=no_scheduler)
    timer.join()
    assert st.state == "completed"
    pid = os.getpid()
    assert lines == [f"r1: running 3/20 (job local:{pid} RUNNING)", f"r1: completed 20/20 (job local:{pid})"]
    write_status(e.run_dir, "running", 3)
    runs.write_job(e.run_dir, rec)
    with pytest.raises(runs.SchedulerError, match="still queued or running after 0 s: r1"):
        runs.wait_for_runs([e], poll_s=0.01, timeout_s=0, echo=lambda _m: None)
