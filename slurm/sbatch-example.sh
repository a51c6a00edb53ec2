#!/bin/bash
# One scaleforge run as a plain sbatch job, for users who prefer sbatch to `orchestrate submit`.
#
#   sbatch --export=ALL,RUN_YAML=/path/run.yaml,RUN_DIR=/path/runs/name-runid slurm/sbatch-example.sh
#
# One srun task per rank: each rank is `python -m scaleforge.pretrain`, which reads SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID (no torchrun), so Slurm's signals reach every rank directly.
# Set --nodes x --ntasks-per-node to the run's tp x pp x dp (tensor parallelism stays inside a node:
# ranks are numbered node by node), and --gpus-per-node on a GPU cluster.
#
# Rendezvous: rank 0's store listens on the job's first node, at the address Slurm records for it
# (NodeAddr, asked with sinfo; node names need not resolve), on a port derived from the job id.
# srun --kill-on-bad-exit=1: one rank failing (a lost node, a crash) ends all of them at once.
#
# Preemption and time limit: USR2 is sent to every rank 120 s before the limit (no `B:`, so the
# ranks get it, not only this script); the trainer saves at the next step and exits with 75. This
# script then submits its own continuation with sbatch, so it needs sbatch on the compute node;
# where only login nodes have Slurm's commands, use `orchestrate submit --executor slurm`, which
# queues the continuation jobs up front (--dependency=afternotok) from the login node.
#
#SBATCH --job-name=scaleforge
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=60
#SBATCH --signal=USR2@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

: "${RUN_YAML:?set RUN_YAML to the RunSpec file (sbatch --export=ALL,RUN_YAML=...)}"
: "${RUN_DIR:?set RUN_DIR to the run directory}"
PYTHON="${PYTHON:-python}"
REQUEUE_EXIT_CODE=75   # scaleforge.pretrain.signals.REQUEUE_EXIT_CODE
MAX_RESUBMITS="${MAX_RESUBMITS:-3}"

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
# This script runs on the allocation's first node.
MASTER_ADDR="$(sinfo -h -N -n "$SLURMD_NODENAME" -o %o | head -n1)"
export MASTER_ADDR="${MASTER_ADDR:-$SLURMD_NODENAME}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}"
# The batch shell ignores the signals meant for the ranks (it must outlive them to resubmit).
trap '' USR2 TERM

mkdir -p "$RUN_DIR/logs"
set +e
srun --kill-on-bad-exit=1 --output="$RUN_DIR/logs/sbatch-%j.rank%t.log" \
    "$PYTHON" -m scaleforge.pretrain "$RUN_YAML" --out "$RUN_DIR"
code=$?
set -e

if [ "$code" -eq "$REQUEUE_EXIT_CODE" ] || grep -q '"state": "preempted"' "$RUN_DIR/status.json" 2>/dev/null; then
    left=$((MAX_RESUBMITS - 1))
    if [ "$left" -ge 0 ]; then
        echo "run saved and stopped; resubmitting (resubmits left: $left)"
        sbatch --export="ALL,RUN_YAML=$RUN_YAML,RUN_DIR=$RUN_DIR,MAX_RESUBMITS=$left" "$0"
        exit 0
    fi
    echo "run saved and stopped; no resubmits left: sbatch this script again to resume" >&2
fi
exit "$code"
