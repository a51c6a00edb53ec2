"""The local executor: its core-bounded queue, its requeue loop and its signal handling.

The queue and signal tests use a stand-in trainer (a few lines of Python that honour the trainer's
contract: status.json, SIGTERM -> save and exit with the requeue code, resume from its own
"checkpoint"), so they take seconds; the last test runs the real trainer through `orchestrate submit`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from scaleforge.orchestrator.run import runs
from scaleforge.orchestrator.run.entries import RunEntry, entries_from_plan, entries_from_specs, prepare_run_dir
from scaleforge.orchestrator.run.executors import local
from test_runs import tiny_spec, write_plan

REQUEUE = 75

STAND_IN = r'''
import json, os, signal, sys, time
run_dir, mode, steps, dt = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
events = open(os.path.join(run_dir, "events.jsonl"), "a", buffering=1)
ckpt = os.path.join(run_dir, "ckpt")
step = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
attempt = sum(1 for _ in open(os.path.join(run_dir, "events.jsonl"))) // 2 + 1
stop = []
for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, lambda n, f: stop.append(n))
events.write(json.dumps({"ev": "start", "t": time.time(), "step": step, "pid": os.getpid()}) + "\n")
def status(state):
    tmp = os.path.join(run_dir, ".status.tmp")
    open(tmp, "w").write(json.dumps({"state": state, "step": step, "total_steps": steps}))
    os.replace(tmp, os.path.join(run_dir, "status.json"))
status("running")
code = 0
while step < steps:
    time.sleep(dt)
    step += 1
    preempt_now = mode == "always-requeue" or (mode == "requeue-once" and attempt == 1 and step == 2)
    if stop or preempt_now:
        open(ckpt, "w").write(str(step))
        status("preempted")
        code = 75
        break
else:
    status("completed")
events.write(json.dumps({"ev": "end", "t": time.time(), "step": step, "code": code}) + "\n")
sys.exit(code)
'''


@pytest.fixture
def stand_in(tmp_path):
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)

    def command(mode: str, steps: int = 3, dt: float = 0.2):
        return lambda e: [sys.executable, str(path), str(e.run_dir), mode, str(steps), str(dt)]

    return command


def make_entries(tmp_path: Path, ranks: list[int]) -> list[RunEntry]:
    specs = [(f"r{i}", tiny_spec(f"r{i}", seed=i, dp=n)) for i, n in enumerate(ranks)]
    return entries_from_specs(specs, tmp_path / "runs")


def events(e: RunEntry) -> list[dict]:
    return [json.loads(line) for line in (e.run_dir / "events.jsonl").read_text().splitlines()]


def test_queue_keeps_ranks_within_cores(tmp_path, stand_in):
    entries = make_entries(tmp_path, [1, 2, 1, 1])
    codes = local.run_local(entries, cores=2, command=stand_in("ok", steps=3, dt=0.15),
                            requeue_code=REQUEUE, echo=lambda _m: None, poll_s=0.02)
    assert codes == {"r0": 0, "r1": 0, "r2": 0, "r3": 0}
    spans = []
    for e in entries:
        ev = events(e)
        spans.append((ev[0]["t"], ev[-1]["t"], e.ranks))
    # at every start, the ranks running (including the one starting) fit the 2 cores
    for start, _end, _ranks in spans:
        busy = sum(r for s, t, r in spans if s <= start < t)
        assert busy <= 2, spans
    # r2 (1 rank) started beside r0 while r1 (2 ranks) waited for both cores: backfill
    (s0, e0, _), (s1, _e1, _), (s2, _e2, _), _ = spans
    assert s2 < e0 <= s1
    # job.json records the end of every run; logs are in the run directory
    for e in entries:
        rec = runs.read_job(e.run_dir)
        assert rec.executor == "local" and rec.exit_code == 0 and rec.ended_at > 0
        assert "=== attempt 1" in (e.run_dir / "logs" / "local.log").read_text()
        assert runs.run_states([e])[0].state == "completed"


def test_more_ranks_than_cores_runs_alone(tmp_path, stand_in):
    entries = make_entries(tmp_path, [1, 4])
    codes = local.run_local(entries, cores=2, command=stand_in("ok", steps=2, dt=0.1),
                            requeue_code=REQUEUE, echo=lambda _m: None, poll_s=0.02)
    assert codes == {"r0": 0, "r1": 0}
    assert events(entries[1])[0]["t"] >= events(entries[0])[-1]["t"]


def test_requeue_loop_resumes(tmp_path, stand_in):
    (e,) = make_entries(tmp_path, [1])
    lines = []
    codes = local.run_local([e], cores=2, command=stand_in("requeue-once", steps=4, dt=0.05),
                            requeue_code=REQUEUE, echo=lines.append, poll_s=0.02)
    assert codes == {"r0": 0}
    ev = events(e)
    assert [x["ev"] for x in ev] == ["start", "end", "start", "end"]
    assert (ev[1]["code"], ev[1]["step"], ev[2]["step"], ev[3]["step"]) == (REQUEUE, 2, 2, 4)
    assert runs.read_job(e.run_dir).attempts == 2
    assert any("resuming (requeue 1/3)" in line for line in lines)


def test_requeue_limit(tmp_path, stand_in):
    (e,) = make_entries(tmp_path, [1])
    codes = local.run_local([e], cores=2, max_requeues=2, command=stand_in("always-requeue", 9, 0.01),
                            requeue_code=REQUEUE, echo=lambda _m: None, poll_s=0.02)
    assert codes == {"r0": REQUEUE}
    assert sum(x["ev"] == "start" for x in events(e)) == 3  # 1 + 2 requeues
    (st,) = runs.run_states([e])
    assert (st.state, st.action) == ("preempted", "resume")


def test_sigterm_saves_running_and_holds_queued(tmp_path, stand_in):
    entries = make_entries(tmp_path, [2, 1])  # r1 waits: r0 fills both cores
    timer = threading.Timer(0.6, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        codes = local.run_local(entries, cores=2, command=stand_in("ok", steps=50, dt=0.05),
                                requeue_code=REQUEUE, echo=lambda _m: None, poll_s=0.02)
    finally:
        timer.cancel()
    assert codes == {"r0": REQUEUE}  # saved and stopped, not requeued while stopping
    assert not (entries[1].run_dir / "events.jsonl").exists()  # never started
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    states = {s.entry.name: (s.state, s.action) for s in runs.run_states(entries)}
    assert states == {"r0": ("preempted", "resume"), "r1": ("new", "start")}


def test_requeue_code_is_the_trainers():
    from scaleforge.pretrain.signals import REQUEUE_EXIT_CODE

    assert local.requeue_exit_code() == REQUEUE_EXIT_CODE == REQUEUE


@pytest.mark.slow
def test_submit_local_real_trainer_resumes_after_sigusr1(tmp_path, tiny_store):
    """`orchestrate submit` with the real trainer: a SIGUSR1 mid-run saves, the executor requeues,
    the run resumes and ends with the same losses as a run that was never interrupted; a second
    submit launches nothing."""
    spec = tiny_spec("lr", steps=16, store=tiny_store)
    plan = write_plan(tmp_path / "plan.yaml", [spec])
    (e,) = entries_from_plan(plan)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    prepare_run_dir(e)
    ref = tmp_path / "reference"  # the uninterrupted run, beside the executor's
    straight_proc = subprocess.Popen(
        [sys.executable, "-m", "scaleforge.pretrain", str(e.spec_path), "--out", str(ref)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([sys.executable, "-m", "scaleforge.cli", "submit", str(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = e.run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)
    trainer = runs.read_job(e.run_dir)
    assert trainer is not None and trainer.attempts == 1
    import psutil

    children = psutil.Process(proc.pid).children()
    assert len(children) == 1
    os.kill(children[0].pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "resuming (requeue 1/3)" in out
    assert runs.read_job(e.run_dir).attempts == 2
    interrupted = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert len(interrupted) == 16

    _, err = straight_proc.communicate(timeout=180)
    assert straight_proc.returncode == 0, err[-2000:]
    straight = [r["loss"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]
    assert interrupted == straight  # bit-identical continuation

    again = subprocess.run([sys.executable, "-m", "scaleforge.cli", "submit", str(plan)],
                           capture_output=True, text=True, env=env, check=True)
    assert "lr: skip (completed)" in again.stdout and "nothing to launch" in again.stdout


def test_growth_stages_start_after_their_source(tmp_path, stand_in):
    """A run whose checkpoint.init_from names another run of the batch starts only after that run
    completed, even with cores free; if its source does not complete, it never starts."""
    from dataclasses import replace

    r0, r1, r2 = make_entries(tmp_path, [1, 1, 1])
    r1 = replace(r1, after=(r0.run_dir,))
    r2 = replace(r2, after=(r1.run_dir,))
    codes = local.run_local([r2, r1, r0], cores=3, command=stand_in("ok", steps=2, dt=0.05),
                            requeue_code=REQUEUE, echo=lambda _m: None, poll_s=0.02)
    assert codes == {"r0": 0, "r1": 0, "r2": 0}
    assert events(r0)[-1]["t"] <= events(r1)[0]["t"] and events(r1)[-1]["t"] <= events(r2)[0]["t"]

    s0, s1 = make_entries(tmp_path / "again", [1, 1])
    s1 = replace(s1, after=(s0.run_dir,))
    lines = []
    codes = local.run_local([s0, s1], cores=2, max_requeues=0,
                            command=stand_in("always-requeue", 3, 0.01), requeue_code=REQUEUE,
                            echo=lines.append, poll_s=0.02)
    assert codes == {"r0": REQUEUE, "r1": 1}
    assert not (s1.run_dir / "events.jsonl").exists()
    assert "r1: not started: it starts from r0, which did not complete" in lines
