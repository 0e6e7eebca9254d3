"""A job list on the GPUs of one node, one job per GPU at a time; or which of its runs are missing.

    make -s jobs > jobs.txt  # Tables 2-4 as one command a line
    python -m w2s_clip_lab.grid --jobs jobs.txt --gpus 0 1 2 3 --logs runs/logs
    python -m w2s_clip_lab.grid --jobs jobs.txt --missing  # the results.json not written yet

Each GPU takes the next line when its job ends and runs it with CUDA_VISIBLE_DEVICES set to that
GPU alone (the job's `cuda` is that GPU), its output appended to `<logs>/job-<n>.log`. Jobs share
the cache folder safely and skip finished runs, so the same command resumes a grid; Ctrl-C, kill or
a closed terminal stops every job (each keeps what it finished). A cluster: w2s_clip_lab/slurm.sh.
"""
import argparse
import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import w2s_clip
from w2s_clip import UserError
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


def stop(running, grace=30.0):
    """Stop every running job as Ctrl-C would (SIGINT to its process group: it finishes writing
    and exits); one still running after `grace` seconds, or when Ctrl-C comes again, gets SIGTERM,
    then SIGKILL: no job is left on a GPU without the grid watching it."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        alive = [proc for _, proc, _, _ in running.values() if proc.poll() is None]
        if not alive:
            break
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            end = time.time() + (wait or 0)
            while wait and time.time() < end and any(proc.poll() is None for proc in alive):
                time.sleep(0.1)
        except KeyboardInterrupt:  # Ctrl-C again: the next signal now
            continue
    for _, proc, log, _ in running.values():
        proc.wait()
        log.close()


def run_grid(jobs, gpus, logs, poll=0.2, out=sys.stdout):
    """Run the shell commands `jobs` with at most one running per GPU of `gpus` (each started with
    CUDA_VISIBLE_DEVICES=<gpu>), each one's output appended to `<logs>/job-<n>.log`. Returns {job
    number: exit status}. On Ctrl-C, SIGTERM or SIGHUP (a closed terminal) every running job is
    stopped (`stop`) and KeyboardInterrupt raised again."""
    Path(logs).mkdir(parents=True, exist_ok=True)
    pending, running, status = list(enumerate(jobs, 1)), {}, {}
    width = len(str(len(jobs)))

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        while pending or running:
            for gpu in [g for g in gpus if g not in running][:len(pending)]:
                n, job = pending[0]
                log = open(Path(logs) / f"job-{n:0{width}d}.log", "a")
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} on GPU {gpu}: {job}\n")
                log.flush()
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
                running[gpu] = (n, subprocess.Popen(job, shell=True, executable="/bin/bash", env=env,
                                                    stdout=log, stderr=subprocess.STDOUT,
                                                    start_new_session=True), log, time.time())
                pending.pop(0)
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
        stop(running)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


COMMANDS = ("w2s_clip.py", "w2s_clip_lab.run", "w2s-clip", "w2s-clip-lab")  # a job line's command


def expected_results(job):
    """The results.json paths a job line (w2s_clip.py, `-m w2s_clip_lab.run` or their console
    scripts, as `make jobs` writes them) writes: one per method (groups expanded) and seed under
    its --out-dir and --domain; None for a line this cannot read."""
    try:
        words = shlex.split(job)
    except ValueError:
        return None
    start = next((i for i, w in enumerate(words) if os.path.basename(w) in COMMANDS), None)
    if start is None:
        return None
    with contextlib.redirect_stderr(io.StringIO()):  # a bad line is reported by the caller
        try:
            args = w2s_clip.parse_args(words[start + 1:], build_parser())
        except SystemExit:
            return None
    methods = w2s_clip.requested_methods(args.method)
    return [w2s_clip.result_path(args.out_dir, args.domain, m, s) for s in args.seeds for m in methods]


def missing_runs(jobs):
    """{job number: [results.json paths not there yet], or None for a line that cannot be read}
    of the jobs with any missing (or unread)."""
    out = {}
    for n, job in enumerate(jobs, 1):
        paths = expected_results(job)
        gone = None if paths is None else [p for p in paths if not p.is_file()]
        if gone is None or gone:
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
                what = (f"{len(paths)} runs missing, e.g. {paths[0]}" if paths is not None
                        else "not a w2s_clip command this can read")
                print(f"job {n}: {what}: {jobs[n - 1][:200]}")
            print(f"{sum(len(p or []) for p in gone.values())} runs missing or unknown in {len(gone)} "
                  f"of {len(jobs)} jobs; to rerun them on SLURM: --array={','.join(map(str, gone))}"
                  if gone else f"every run of the {len(jobs)} jobs is there")
            sys.exit(1 if gone else 0)
        gpus = args.gpus or visible_gpus()
        if not gpus:
            raise UserError("no GPU visible; pass --gpus 0 1 ... (or run the list one line at a "
                            "time on the CPU: bash jobs.txt)")
        if len(set(gpus)) != len(gpus) or any("," in g for g in gpus):
            raise UserError(f"--gpus {' '.join(gpus)}: name each GPU once, separated by spaces "
                            f"(--gpus 0 1 2 3); one job per GPU at a time")
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
