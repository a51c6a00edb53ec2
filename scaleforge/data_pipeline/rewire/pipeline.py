"""The REWIRE pipeline: validate everything, then let datatrove run the stages that are not done.

All checks that can fail on bad input (the config, OUT, the pool and the classifier sets, the
model directory or endpoint, the executor) run before the first write. The stages are datatrove
steps (engine.py); a rerun skips finished tasks and, inside the rewrite stage, committed batches.
The report is made from the stages' summaries, in this process.
"""

from __future__ import annotations

import time
from pathlib import Path

from scaleforge.data_pipeline.rewire import engine, files, report, texts
from scaleforge.data_pipeline.rewire.backends import Generator, provide
from scaleforge.data_pipeline.rewire.config import RewireConfig
from scaleforge.errors import ConfigError


def check_out(cfg: RewireConfig, out: Path) -> None:
    """OUT is new, empty, or an earlier run of this very config."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory: choose another --out")
    marker = out / files.MARKER
    if marker.is_file():
        digest = files.read_json(marker).get("digest")
        if digest != cfg.digest():
            raise ConfigError(
                f"--out {out} holds a REWIRE run of another config (digest {str(digest)[:12]} != "
                f"{cfg.digest()[:12]}): choose another --out, or delete it to start over"
            )
    elif any(out.iterdir()):
        raise ConfigError(f"--out {out} exists, is not empty and is not a REWIRE output: choose another --out")


def validate_inputs(cfg: RewireConfig) -> None:
    """The pool and the classifier sets select documents (their first is read); the sets differ."""
    texts.check(cfg.pool, "pool")
    for where, sets in (("classify.positives", cfg.classify.positives),
                        ("classify.negatives", cfg.classify.negatives),
                        ("filter.positives", cfg.filter.positives)):
        for i, ts in enumerate(sets):
            texts.check(ts, f"{where}[{i}]")
    from scaleforge.data_pipeline.rewire.stages import set_texts

    pos = set_texts(cfg.classify.positives, "classify.positives")
    neg = set_texts(cfg.classify.negatives, "classify.negatives")
    if {" ".join(t.split()) for t in pos} == {" ".join(t.split()) for t in neg}:
        raise ConfigError("classify: positives and negatives are the same documents, so the classifier "
                          "has one class: name different sets")


def validate_generator(cfg: RewireConfig, log=None) -> None:
    """A local model directory holds a model (the packaged one is converted once); an endpoint answers."""
    from scaleforge.data_pipeline.rewire.backends import HttpGenerator, resolve_model_dir

    if cfg.rewrite.backend == "http":
        HttpGenerator(cfg.rewrite).probe()
    else:
        resolve_model_dir(cfg.rewrite.model, log)


def run(cfg: RewireConfig, out: str | Path, *, until: str = "report", executor: str = "local",
        generator: Generator | None = None, echo=print) -> dict | None:
    """Run the stages up to `until`; returns the report when made. `generator`: a loaded backend
    the rewrite tasks of this process use (the local executor with one worker)."""
    out = Path(out)
    if until not in files.STAGES:
        raise ConfigError(f"--stage must be one of {', '.join(files.STAGES)}, got {until!r}")
    if executor not in engine.EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(engine.EXECUTORS)}, got {executor!r}")
    check_out(cfg, out)
    validate_inputs(cfg)
    from scaleforge.data_pipeline.rewire.stages import tokenizer

    tokenizer(cfg)  # a missing tokenizer store stops here
    provide(generator)
    if generator is None and until != "classify" and not files.summary_path(out, "filter").is_file():
        validate_generator(cfg, log=echo)

    # Everything checked: from here on OUT is written.
    out.mkdir(parents=True, exist_ok=True)
    if not (out / files.MARKER).is_file():
        files.write_json(out / files.MARKER, {"digest": cfg.digest(), "config": cfg.to_dict()})
    files.log(out, f"start: until={until} executor={executor} tasks={cfg.executor.tasks} "
                   f"workers={cfg.executor.workers}")
    t0 = time.perf_counter()
    engine.run(cfg, out, until, executor, echo)
    if until != "report":
        return None
    body = make_report(cfg, out)
    files.write_json(out / files.REPORT, body)
    files.log(out, f"report written ({time.perf_counter() - t0:.1f} s this attempt)")
    echo(report.table(body))
    return body


def make_report(cfg: RewireConfig, out: Path) -> dict:
    """report.json from the stages' summaries (data only: equal for a resumed and an uninterrupted run)."""
    classify_s = files.read_json(files.summary_path(out, "classify"))
    filter_s = files.read_json(files.summary_path(out, "filter"))
    mix_s = files.read_json(files.summary_path(out, "mix"))
    settings = files.read_json(files.stage_dir(out, "rewrite") / "settings.json")
    rewrite_s = filter_s.pop("rewrite")
    spearman = filter_s.pop("spearman_raw_vs_rewrite")
    overlap = filter_s.pop("overlap")
    dedup = mix_s.pop("dedup")
    pool = {"documents": classify_s.pop("documents"), "tokens": classify_s.pop("tokens")}
    return {
        "pool": pool,
        "classify": {**classify_s, "scored": pool["documents"]},
        "rewrite": {**rewrite_s, **settings},
        "filter": filter_s,
        "dedup": dedup,
        "mix": mix_s,
        "overlap": overlap,
        "spearman_raw_vs_rewrite": spearman,
        "paper": report.PAPER,
        "config_digest": cfg.digest(),
    }
