#!/usr/bin/env bash
# The grid of Tables 2-4 as a SLURM job array, then the tables as a job that waits for it.
#
#   bash w2s_clip_lab/slurm.sh DATA=/scratch/domainnet OUT=runs THROTTLE=16 TIME=08:00:00
#
# Any VAR=value is passed to `make jobs` (DATA, OUT, CACHE, DOMAINS, SEEDS, FLAGS, ...) and read
# here (THROTTLE, TIME, TABLES_TIME, CPUS, SBATCH_EXTRA). It writes the job list, one command a
# line, to $OUT/slurm/jobs.txt and creates $OUT/slurm/logs/ (SLURM opens --output before the job
# runs, so the folder must exist), then submits
#   - the array: one task a line, one GPU a task, at most $THROTTLE tasks at once, --time $TIME,
#     --requeue (a preempted or failed node's task runs again: finished runs are kept and skipped,
#     caches are whole files, so a rerun resumes), output $OUT/slurm/logs/<array>_<task>.out;
#   - the tables: --dependency=afterany on the array (also after failed tasks), which names every
#     run still missing (python -m w2s_clip_lab.grid --missing) and builds the tables from the
#     runs there are (make tables).
# A partition that mixes GPU generations: --precision auto is bf16 on an A100 and fp16 on a V100
# (no bf16), and the tables keep runs of two precisions apart as variants. Pin one precision,
# FLAGS="--precision fp16", or one generation, SBATCH_EXTRA="--constraint=a100".
# The same script runs each array task (--task) and the tables job (--tables) on the nodes.
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
if [ -n "${SLURM_JOB_ID:-}" ]; then  # on a node SLURM runs a copy of this file: the checkout is
  cd "$SLURM_SUBMIT_DIR"             # where it was submitted from, below
else
  cd "$(dirname "$script")/.."
fi
PY=${PY:-.venv/bin/python}

if [ "${1:-}" = "--task" ]; then  # one array task: line $SLURM_ARRAY_TASK_ID of the job list
  line=$(sed -n "${SLURM_ARRAY_TASK_ID}p" "$2")
  echo "task ${SLURM_ARRAY_TASK_ID} on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}: $line"
  exec bash -c "$line"
fi
if [ "${1:-}" = "--tables" ]; then  # after the array: the missing runs named, then the tables
  "$PY" -m w2s_clip_lab.grid --missing --jobs "$2" || true
  exec make tables "OUT=$3" "TABLES=$4"
fi

for kv in "$@"; do
  case $kv in *=*) declare "${kv%%=*}=${kv#*=}";; *) echo "error: $kv is not VAR=value" >&2; exit 1;; esac
done
OUT=${OUT:-runs} TABLES=${TABLES:-results} THROTTLE=${THROTTLE:-8} TIME=${TIME:-08:00:00}
TABLES_TIME=${TABLES_TIME:-01:00:00} CPUS=${CPUS:-8}
command -v sbatch > /dev/null || { echo "error: sbatch not found: run this on a SLURM login node" >&2; exit 1; }
mkdir -p "$OUT/slurm/logs"
jobs="$OUT/slurm/jobs.txt"
make -s jobs "$@" > "$jobs"
n=$(grep -c . "$jobs")
# shellcheck disable=SC2086  # SBATCH_EXTRA holds several options
array=$(sbatch --parsable --job-name=w2s-grid --array="1-$n%$THROTTLE" --gres=gpu:1 \
  --cpus-per-task="$CPUS" --time="$TIME" --requeue --output="$OUT/slurm/logs/%A_%a.out" \
  ${SBATCH_EXTRA:-} "$script" --task "$jobs")
array=${array%%;*}  # --parsable prints <id> or <id>;<cluster>
# shellcheck disable=SC2086
tables=$(sbatch --parsable --job-name=w2s-tables --dependency="afterany:$array" --cpus-per-task=2 \
  --time="$TABLES_TIME" --output="$OUT/slurm/logs/tables_%j.out" ${SBATCH_EXTRA:-} \
  "$script" --tables "$jobs" "$OUT" "$TABLES")
echo "array $array: $n tasks, at most $THROTTLE at once; tables job ${tables%%;*} after it"
echo "logs: $OUT/slurm/logs/; the tables: $TABLES/ (squeue -u \$USER to follow)"
