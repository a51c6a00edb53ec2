"""The run directory has one owner (scaleforge.rundir), and a job state that cannot be read is
`unknown`, never "gone": `status` shows it and exits 0, `submit` retries and then launches nothing."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

from scaleforge import cli, rundir
from scaleforge.orchestrator.run import executors, runs
from scaleforge.orchestrator.run.entries import entries_from_plan, prepare_run_dir
from scaleforge.orchestrator.run.executors import local
from test_runs import tiny_spec, write_plan

REPO = Path(__file__).resolve().parents[1]
# The modules that read or write run directories through scaleforge.rundir.
CLIENTS = ["scaleforge/orchestrator/run/runs.py", "scaleforge/orchestrator/run/entries.py",
           "scaleforge/orchestrator/fit/refit.py", "scaleforge/orchestrator/report/refit_cli.py",
           "scaleforge/orchestrator/run/status.py", "scaleforge/orchestrator/run/submit.py",
           "scaleforge/orchestrator/run/executors/local.py", "scaleforge/orchestrator/run/executors/slurm.py",
           "scaleforge/orchestrator/run/executors/slurm_task.py",
           "scaleforge/pretrain/cli.py", "scaleforge/pretrain/metrics.py", "scaleforge/pretrain/loop.py",
           "scaleforge/pretrain/checkpoint.py", "scaleforge/pretrain/grow.py"]
NAMES = {rundir.SPEC_FILE, rundir.METRICS_FILE, rundir.STATUS_FILE, rundir.JOB_FILE}


def test_names_are_spelled_once():
    """No client module spells a run-directory file name as a path (messages may name them)."""
    for rel in CLIENTS:
        tree = ast.parse((REPO / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                word = node.value.strip().rsplit("/", 1)[-1]
                assert word not in NAMES | {rundir.LATEST, rundir.CHECKPOINTS_DIR}, \
                    (rel, node.lineno, node.value)
    assert rundir.REQUEUE_EXIT_CODE == 75
    from scaleforge.pretrain import signals

    assert signals.REQUEUE_EXIT_CODE is rundir.REQUEUE_EXIT_CODE


def test_torch_free():
    code = ("import sys; sys.modules['torch'] = None; import scaleforge.rundir, "
            "scaleforge.orchestrator.run.runs, scaleforge.orchestrator.run.executors.slurm, "
            "scaleforge.orchestrator.run.executors.slurm_task, scaleforge.orchestrator.run.executors.slurm_states, "
            "scaleforge.orchestrator.run.executors.local, scaleforge.orchestrator.run.status, "
            "scaleforge.orchestrator.run.submit")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_atomic_writes_and_tolerant_reads(tmp_path):
    rundir.write_status(tmp_path, {"state": "running", "step": 3})
    assert rundir.read_status(tmp_path) == {"state": "running", "step": 3}
    assert list(tmp_path.glob(".*tmp*")) == []  # the temporary file was renamed into place
    rundir.status_path(tmp_path).write_text("{torn")
    assert rundir.read_status(tmp_path) == {} and rundir.read_run_dir(tmp_path).state is None
    rundir.metrics_path(tmp_path).write_text(
        '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    assert rundir.last_train_line(tmp_path) == (2, 4.0)
    rundir.truncate_metrics_after(rundir.metrics_path(tmp_path), 1)
    assert rundir.read_metrics(tmp_path) == [{"step": 1, "loss": 5.0}]
    ckpt = rundir.checkpoints_dir(tmp_path)
    ckpt.mkdir()
    (ckpt / rundir.LATEST).write_text("step_0000005\n")
    assert rundir.latest_checkpoint(tmp_path) is None  # names a directory that does not exist
    (ckpt / "step_0000005").mkdir()
    assert rundir.latest_checkpoint(tmp_path) == "step_0000005"
    assert rundir.read_latest(tmp_path) == "step_0000005"
    rec = rundir.JobRecord(executor="slurm", job_ids=("4_1", "5"), after=("/x/a-1",))
    rundir.write_job(tmp_path, rec)
    assert rundir.read_job(tmp_path) == rec
    rundir.job_path(tmp_path).write_text(json.dumps({"executor": "slurm", "job_ids": 3}))
    assert rundir.read_job(tmp_path) is None


def test_checkpoint_names_are_spelled_here():
    """The step folders' names as the trainer writes them and every reader parses them."""
    assert rundir.step_dir_name(40) == "step_0000040"
    assert rundir.parse_step("step_0000040") == 40
    assert rundir.parse_step(rundir.step_dir_name(12345678)) == 12345678
    for other in ("latest", ".tmp_step_0000040", "step_", "step_4x"):
        assert rundir.parse_step(other) is None
    assert rundir.tmp_name(rundir.step_dir_name(3)) == ".tmp_step_0000003"
    assert rundir.is_step_dir_name("step_0000003") and not rundir.is_step_dir_name("../step_1")
    assert not rundir.is_step_dir_name("latest")


def _block_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    monkeypatch.setattr(executors, "BACKOFF_S", (0.05, 0.1))


def test_unreadable_process_table_is_unknown(tmp_path, monkeypatch, capsys):
    """psutil missing: a live local run reads as unknown; status exits 0, submit retries and fails
    without launching or recording anything."""
    plan = write_plan(tmp_path / "plan.yaml", [tiny_spec("a", steps=2)])
    (e,) = entries_from_plan(plan)
    prepare_run_dir(e)
    rec = local.local_record(attempts=1)
    rundir.write_job(e.run_dir, rec)
    assert runs.run_states([e])[0].state == "running"
    before = rundir.job_path(e.run_dir).read_bytes()

    _block_psutil(monkeypatch)
    (st,) = runs.run_states([e], tolerant=True)
    assert (st.state, st.action) == ("unknown", "skip") and "psutil" in st.why
    assert cli.main(["status", str(plan), "--json"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["state"] == "unknown"
    t0 = time.perf_counter()
    assert cli.main(["submit", str(plan)]) != 0
    err = capsys.readouterr()
    assert time.perf_counter() - t0 >= 0.15  # it waited out the backoff
    assert err.out.count("retrying in") == 2
    assert err.err.startswith("error: asking the executor for job states failed 3 times: ")
    assert len(err.err.strip().splitlines()) == 1 and "psutil" in err.err
    assert rundir.job_path(e.run_dir).read_bytes() == before  # nothing launched or recorded
    assert not (rundir.log_dir(e.run_dir) / local.LOG_NAME).exists()


def test_growth_stage_waits_for_its_source(tmp_path, capsys):
    """A run whose checkpoint.init_from names another run of the plan waits for it."""
    from dataclasses import replace

    from scaleforge.config import run_id

    first = tiny_spec("s0", steps=2)
    second = tiny_spec("s1", steps=2, seed=7)
    second = replace(second, checkpoint=replace(second.checkpoint,
                                                init_from=f"../s0-{run_id(first)}"))
    plan = write_plan(tmp_path / "plan.yaml", [first, second])
    s0, s1 = entries_from_plan(plan)
    assert s0.after == () and s1.after == (s0.run_dir,) and s1.after_names == ("s0",)
    st = {s.entry.name: s for s in runs.run_states([s0, s1])}
    assert st["s1"].waits_for == ("s0",) and st["s0"].waits_for == ()
    assert cli.main(["submit", str(plan), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s1: start (new), waits for s0" in out
    # --only the stage whose source neither completed nor is submitted: refused in one line
    assert cli.main(["submit", str(plan), "--only", "s1", "--dry-run"]) != 0
    assert "starts from s0, which is not completed" in capsys.readouterr().err
    s0.run_dir.mkdir(parents=True)
    rundir.write_status(s0.run_dir, {"state": "completed", "step": 2})
    assert runs.run_states([s0, s1])[1].waits_for == ()
