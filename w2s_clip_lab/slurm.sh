#!/usr/bin/env bash
# The grid of Tables 2-4 as SLURM job arrays, then the tables as a job that waits for them.
#
#   bash w2s_clip_lab/slurm.sh DATA=/scratch/domainnet OUT=runs THROTTLE=16 TIME=08:00:00
#
# Any VAR=value is passed to `make jobs` (DATA, OUT, CACHE, DOMAINS, SEEDS, FLAGS, PY, ...) and read
# here: THROTTLE (tasks at once, 8), TIME (a task's limit, 08:00:00), CHUNK (tasks per array, 1000:
# under SLURM's default MaxArraySize of 1001), CPUS (8), TABLES (results), TABLES_TIME (01:00:00),
# SBATCH_EXTRA (options of every job: --account=..., --partition=...) and ARRAY_EXTRA (of the GPU
# tasks only: --constraint=a100, --qos=..., ...).
# It writes this submission's job list, one command a line, to $OUT/slurm/jobs-<id>.txt and creates
# $OUT/slurm/logs/ (SLURM opens --output before a task runs, so the folder must exist), then submits
#   - the arrays: one task a line, one GPU a task, at most $THROTTLE tasks at once, --time $TIME,
#     --requeue (a task of a failed or preempted node runs again: finished runs are kept and skipped,
#     caches are whole files, so a rerun resumes), output $OUT/slurm/logs/<array>_<task>.out;
#   - the tables: --dependency=afterany on every array (also after failed tasks), which names every
#     run still missing (python -m w2s_clip_lab.grid --missing, with the --array=... to resubmit
#     them: a task that ran out of --time or failed is not requeued by SLURM) and builds the tables
#     from the runs there are.
# A partition that mixes GPU generations: --precision auto is bf16 on an A100 and fp16 on a V100
# (no bf16), and the tables keep runs of two precisions apart as variants. Pin one precision,
# FLAGS="--precision fp16", or one generation, ARRAY_EXTRA="--constraint=a100".
# On the nodes the same script runs each task (--task) and the tables job (--tables), in the
# checkout it was submitted from.
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

if [ "${1:-}" = "--task" ]; then  # --task ROOT JOBS OFFSET: line OFFSET + SLURM_ARRAY_TASK_ID
  cd "$2"
  n=$(( $4 + SLURM_ARRAY_TASK_ID ))
  line=$(sed -n "${n}p" "$3")
  [ -n "$line" ] || { echo "error: $3 has no line $n" >&2; exit 1; }
  echo "job $n on $(hostname), CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-}: $line"
  exec bash -c "$line"
fi
if [ "${1:-}" = "--tables" ]; then  # --tables ROOT JOBS OUT TABLES PY: missing runs named, tables
  cd "$2"
  "$6" -m w2s_clip_lab.grid --missing --jobs "$3" || true
  exec "$6" -m w2s_clip_lab.run --build-tables --out-dir "$4" --tables-dir "$5"
fi

root="$(dirname "$script")/.."
root="$(cd "$root" && pwd)"
cd "$root"
for kv in "$@"; do
  case $kv in *=*) declare "${kv%%=*}=${kv#*=}";; *) echo "error: $kv is not VAR=value" >&2; exit 1;; esac
done
OUT=${OUT:-runs} TABLES=${TABLES:-results} THROTTLE=${THROTTLE:-8} TIME=${TIME:-08:00:00}
TABLES_TIME=${TABLES_TIME:-01:00:00} CPUS=${CPUS:-8} CHUNK=${CHUNK:-1000} PY=${PY:-.venv/bin/python}
command -v sbatch > /dev/null || { echo "error: sbatch not found: run this on a SLURM login node" >&2; exit 1; }
mkdir -p "$OUT/slurm/logs"
jobs=$(mktemp "$OUT/slurm/jobs-XXXXXX.txt")  # this submission's own list: tasks read it later
make -s --no-print-directory jobs "$@" > "$jobs" || { rm -f "$jobs"; exit 1; }
n=$(grep -c . "$jobs" || true)
[ "$n" -gt 0 ] || { echo "error: make jobs $* printed no job (DOMAINS? SEEDS?)" >&2; exit 1; }
arrays=()
for ((offset = 0; offset < n; offset += CHUNK)); do
  size=$(( n - offset < CHUNK ? n - offset : CHUNK ))
  # shellcheck disable=SC2086  # SBATCH_EXTRA and ARRAY_EXTRA hold several options
  id=$(sbatch --parsable --job-name=w2s-grid --array="1-$size%$THROTTLE" --gres=gpu:1 \
    --cpus-per-task="$CPUS" --time="$TIME" --requeue --output="$OUT/slurm/logs/%A_%a.out" \
    ${SBATCH_EXTRA:-} ${ARRAY_EXTRA:-} "$script" --task "$root" "$jobs" "$offset")
  arrays+=("${id%%;*}")  # --parsable prints <id> or <id>;<cluster>
done
after=$(IFS=:; echo "${arrays[*]}")
tables_args=(--job-name=w2s-tables --dependency="afterany:$after" --cpus-per-task=2
             --time="$TABLES_TIME" --output="$OUT/slurm/logs/tables_%j.out")
# shellcheck disable=SC2086
if ! tables=$(sbatch --parsable "${tables_args[@]}" ${SBATCH_EXTRA:-} \
    "$script" --tables "$root" "$jobs" "$OUT" "$TABLES" "$PY"); then
  echo "error: the tables job was not submitted; once the arrays end, run:" >&2
  echo "  $PY -m w2s_clip_lab.grid --missing --jobs $jobs; $PY -m w2s_clip_lab.run --build-tables --out-dir $OUT --tables-dir $TABLES" >&2
  exit 1
fi
echo "arrays ${arrays[*]}: $n tasks, at most $THROTTLE at once each; tables job ${tables%%;*} after them"
echo "job list: $jobs; logs: $OUT/slurm/logs/; the tables: $TABLES/ (squeue -u \$USER to follow)"
