"""A job list on the GPUs of one node, one job per GPU at a time; or which of its runs are missing.

    make -s jobs > jobs.txt  # Tables 2-4 as one command a line
    python -m w2s_clip_lab.grid --jobs jobs.txt --gpus 0 1 2 3 --logs runs/logs
    python -m w2s_clip_lab.grid --jobs jobs.txt --missing  # the results.json not written yet

Each GPU takes the next line when its job ends and runs it with CUDA_VISIBLE_DEVICES set to that
GPU alone (the job's `cuda` is that GPU), its output in `<logs>/job-<n>.log`. Jobs share the cache
folder safely and skip finished runs, so the same command resumes a grid; Ctrl-C stops every job
(each keeps what it finished). A cluster's array: w2s_clip_lab/slurm.sh.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import w2s_clip
from w2s_clip import METHOD_GROUPS, UserError
from w2s_clip_lab.run import build_parser


def read_jobs(path):
    """The job lines of `path` (`-`: stdin), blank lines and `#` comments left out."""
    try:
        text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    except OSError as e:
        raise UserError(f"--jobs {path}: cannot be read ({e.strerror}); write it with "
                        f"`make -s jobs > {path}`") from None
    jobs = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not jobs:
        raise UserError(f"--jobs {path} lists no job; write it with `make -s jobs > {path}`")
    return jobs


def run_grid(jobs, gpus, logs, poll=0.2, out=sys.stdout):
    """Run the shell commands `jobs` with at most one running per GPU of `gpus` (each started with
    CUDA_VISIBLE_DEVICES=<gpu>), each one's output to `<logs>/job-<n>.log`. Returns {job number:
    exit status}; on Ctrl-C every running job gets SIGINT and is waited for (its finished runs
    are whole files), then KeyboardInterrupt is raised again."""
    Path(logs).mkdir(parents=True, exist_ok=True)
    pending, running, status = list(enumerate(jobs, 1)), {}, {}
    width = len(str(len(jobs)))
    try:
        while pending or running:
            for gpu in [g for g in gpus if g not in running][:len(pending)]:
                n, job = pending.pop(0)
                log = open(Path(logs) / f"job-{n:0{width}d}.log", "w")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                proc = subprocess.Popen(job, shell=True, executable="/bin/bash", env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
                running[gpu] = (n, proc, log, time.time())
                print(f"[gpu {gpu}] job {n}/{len(jobs)} started: {job[:100]}", file=out, flush=True)
            time.sleep(poll)
            for gpu, (n, proc, log, start) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    status[n] = proc.returncode
                    del running[gpu]
                    print(f"[gpu {gpu}] job {n}/{len(jobs)} {'done' if proc.returncode == 0 else 'FAILED'}"
                          f" in {time.time() - start:.0f} s (exit {proc.returncode})", file=out, flush=True)
    except KeyboardInterrupt:
        for n, proc, log, _ in running.values():
            os.killpg(proc.pid, signal.SIGINT)  # the job's own Ctrl-C: it exits 130, files whole
        for n, proc, log, _ in running.values():
            proc.wait()
            log.close()
        raise
    return status


def expected_results(job):
    """The results.json paths a job line of `make jobs` (w2s_clip.py or `-m w2s_clip_lab.run`)
    writes: one per method (groups expanded) and seed, under its --out-dir and --domain."""
    words = shlex.split(job)
    for start, word in enumerate(words):
        if word.endswith("w2s_clip.py") or word == "w2s_clip_lab.run":
            break
    else:
        return []
    try:
        args = w2s_clip.parse_args(words[start + 1:], build_parser())
    except SystemExit:
        return []
    methods = dict.fromkeys(m for name in args.method for m in METHOD_GROUPS.get(name, [name]))
    return [w2s_clip.result_path(args.out_dir, args.domain, m, s) for s in args.seeds for m in methods]


def missing_runs(jobs):
    """{job number: [results.json paths not there yet]} of the jobs with any missing."""
    out = {}
    for n, job in enumerate(jobs, 1):
        gone = [p for p in expected_results(job) if not p.is_file()]
        if gone:
            out[n] = gone
    return out


def parse_args(argv=None):
    """The command line of the grid."""
    p = w2s_clip.OneLineParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog="\n".join(line for line in __doc__.splitlines()
                                                if line.startswith("    ")))
    p.add_argument("--jobs", default="-", help="the job list, one shell command a line (make -s "
                                               "jobs); -: standard input (default)")
    p.add_argument("--gpus", nargs="+", help="the GPUs to use, by index or UUID (default: every "
                                             "one in CUDA_VISIBLE_DEVICES, else every visible one)")
    p.add_argument("--logs", default="logs", help="where each job's output goes, job-<n>.log")
    p.add_argument("--missing", action="store_true",
                   help="only name the runs of the list that have no results.json yet (exit 1 if any)")
    return p.parse_args(argv)


def visible_gpus():
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries, else torch's count."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def main(argv=None):
    """Run or check a job list; exit status 1 if a job failed or a run is missing, 130 on Ctrl-C."""
    args = parse_args(argv)
    try:
        jobs = read_jobs(args.jobs)
        if args.missing:
            gone = missing_runs(jobs)
            for n, paths in gone.items():
                print(f"job {n}: {len(paths)} runs missing, e.g. {paths[0]}: {jobs[n - 1][:200]}")
            print(f"{sum(map(len, gone.values()))} runs missing in {len(gone)} of {len(jobs)} jobs"
                  if gone else f"every run of the {len(jobs)} jobs is there")
            sys.exit(1 if gone else 0)
        gpus = args.gpus or visible_gpus()
        if not gpus:
            raise UserError("no GPU visible; pass --gpus 0 1 ... (or run the list one line at a "
                            "time on the CPU: bash jobs.txt)")
        if len(set(gpus)) != len(gpus):
            raise UserError(f"--gpus {' '.join(gpus)} names a GPU twice; one job per GPU at a time")
        status = run_grid(jobs, gpus, args.logs)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted: every job stopped; the same command resumes the grid", file=sys.stderr)
        sys.exit(130)
    failed = sorted(n for n, code in status.items() if code != 0)
    print(f"{len(jobs)} jobs on {len(gpus)} GPUs: {len(jobs) - len(failed)} done, {len(failed)} failed"
          + (f" (jobs {', '.join(map(str, failed))}: see {args.logs}/job-<n>.log)" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
