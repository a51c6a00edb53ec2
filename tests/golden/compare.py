"""Prove a change numerics-neutral: the golden runs of two commits give equal losses, bit for bit.

    python tests/golden/compare.py --base COMMIT      (make golden-compare BASE=COMMIT)

Checks COMMIT out into a temporary git worktree (removed afterwards), trains the golden runs
(tests/golden/make_golden.py: single, TP=2, PP=2 of examples/dense-tiny.yaml, 20 steps and a final
evaluation) there and in this working tree, on this machine with the same environment, and requires
every loss to be equal (==). Each side runs its own source (PYTHONPATH is the tree, never the
installed package) and its own example; the training driver and the runs' overrides are this
tree's, so COMMIT needs only `python -m scaleforge.cli train`. Exit 0 when every run is equal; 1
naming the first differing step of each run that differs, with both values.

Losses of one commit on two machines may differ in their last bits (tests/test_golden.py); two
commits on one machine may not, unless one of them changes the numbers.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("make_golden", Path(__file__).with_name("make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)
ROOT = make_golden.ROOT


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def first_difference(base: dict, work: dict) -> str | None:
    """'step N: base X, working tree Y' for the first loss that differs, None when all are equal."""
    labelled = [(f"step {i + 1}", v) for i, v in enumerate(base["loss"])]
    labelled += [("final eval", v) for v in base["eval_loss"]]
    values = work["loss"] + work["eval_loss"]
    if len(values) != len(labelled):
        return f"{len(labelled)} losses at base, {len(values)} in the working tree"
    for (label, a), b in zip(labelled, values):
        if a != b:  # NaN differs from NaN too: a diverged run is not neutral
            return f"first differing {label}: base {a!r}, working tree {b!r}"
    return None


def check_source(root: Path, env: dict[str, str]) -> None:
    """The ranks of a run of `root` import scaleforge from `root` (not the editable install)."""
    found = subprocess.run(
        [sys.executable, "-c", "import scaleforge; print(scaleforge.__file__)"], cwd=root, check=True,
        capture_output=True, text=True, env=make_golden.tree_env(root, env)).stdout
    if not Path(found.strip()).resolve().is_relative_to(root.resolve()):
        sys.exit(f"golden-compare: {root} would run scaleforge from {found.strip()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="commit to compare the working tree with")
    ap.add_argument("--runs", nargs="*", default=sorted(make_golden.RUNS), help="golden runs")
    args = ap.parse_args()
    commit = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    # Both sides read the same token stores, wherever this tree's default puts them.
    home = os.environ.get("SCALEFORGE_HOME") or str(Path.home() / ".cache" / "scaleforge")
    env = {"SCALEFORGE_HOME": home}
    dirty = " (with its uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    print(f"golden-compare: base {args.base} = {commit[:12]} against the working tree{dirty}")
    failed = []
    with tempfile.TemporaryDirectory(prefix="golden-compare-") as tmp:
        tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(tree), commit)
        try:
            for root in (tree, ROOT):
                check_source(root, env)
            for name in args.runs:
                nproc, overrides = make_golden.RUNS[name]
                base = make_golden.train(Path(tmp) / "out-base" / name, nproc, overrides, root=tree, env=env)
                work = make_golden.train(Path(tmp) / "out-work" / name, nproc, overrides, env=env)
                diff = first_difference(base, work)
                n = len(work["loss"]) + len(work["eval_loss"])
                print(f"  {name}: {diff}" if diff else f"  {name}: {n} losses equal bit for bit")
                if diff:
                    failed.append(name)
        finally:
            git("worktree", "remove", "--force", str(tree))
    if failed:
        print(f"golden-compare: FAILED, {', '.join(failed)} differ from {args.base}: not numerics-neutral")
        return 1
    print(f"golden-compare: passed, the working tree's losses equal {args.base}'s bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
