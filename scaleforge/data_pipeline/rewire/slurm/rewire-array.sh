#!/bin/bash
# REWIRE rewrite stage on a Slurm cluster: one array task per shard; each task starts an
# OpenAI-compatible server (vLLM, or SGLang) on its GPU node and rewrites its shard against it.
#
#   orchestrate rewire CONFIG.yaml --out OUT --stage classify     # prints the shard count N
#   sbatch --array=0-$((N-1)) --export=ALL,CONFIG=CONFIG.yaml,OUT=OUT,MODEL=meta-llama/Llama-3.3-70B-Instruct \
#       rewire-array.sh
#   orchestrate rewire CONFIG.yaml --out OUT                      # filter, mix, report (after the array)
#
# CONFIG must say `rewrite: {backend: http, server: vllm, model: <MODEL as served>}`; the endpoint
# is set per task. A task that is killed or preempted loses at most its batch in flight; a failed
# shard is marked failed in OUT/rewrite and a resubmission of the same array reruns only the shards
# without a finished file. Set SERVER=sglang to use SGLang instead of vLLM.
#SBATCH --job-name=rewire
#SBATCH --array=0-0
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=rewire-%A_%a.out

set -euo pipefail
: "${CONFIG:?set CONFIG to the REWIRE config}"
: "${OUT:?set OUT to the REWIRE output directory}"
: "${MODEL:?set MODEL to the model the server loads}"
SERVER="${SERVER:-vllm}"
TP="${TP:-${SLURM_GPUS_ON_NODE:-8}}"
# One port per array task, so tasks that share a node do not collide.
PORT=$((20000 + ${SLURM_ARRAY_TASK_ID:-0} % 10000))
SHARD="${SLURM_ARRAY_TASK_ID:-0}"
LOG="$OUT/rewrite/server-$SHARD.log"
mkdir -p "$OUT/rewrite"

if [ "$SERVER" = "sglang" ]; then
    python -m sglang.launch_server --model-path "$MODEL" --host 127.0.0.1 --port "$PORT" \
        --tp-size "$TP" >"$LOG" 2>&1 &
else
    vllm serve "$MODEL" --host 127.0.0.1 --port "$PORT" --tensor-parallel-size "$TP" \
        --max-model-len 16384 >"$LOG" 2>&1 &
fi
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT

# Large models take minutes to load: wait up to 30 minutes for the health check.
for _ in $(seq 1 360); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server exited; see $LOG" >&2; exit 1; fi
    sleep 5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server not healthy after 30 min; see $LOG" >&2; exit 1; }

orchestrate rewire "$CONFIG" --out "$OUT" --stage rewrite --shard "$SHARD" \
    --endpoint "http://127.0.0.1:$PORT/v1"
