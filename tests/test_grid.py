"""The grid on one node's GPUs (w2s_clip_lab.grid) and as a SLURM array (w2s_clip_lab/slurm.sh),
with fake jobs and a fake sbatch: no GPU, no cluster."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import HERE, good_result, put
from w2s_clip_lab import grid

FAKE_JOB = ("{py} -c \"import json, os, sys, time; s = time.time(); time.sleep(0.4); "
            "json.dump({{'gpu': os.environ['CUDA_VISIBLE_DEVICES'], 'start': s, 'end': time.time()}}, "
            "open(sys.argv[1], 'w'))\" {out}")


def test_a_job_list_is_spread_over_4_gpus_never_two_jobs_on_one(tmp_path):
    """Ten fake jobs that record CUDA_VISIBLE_DEVICES and their start and end times: every GPU
    is used, the jobs on one GPU never overlap, four run at once, a failed job is named."""
    jobs = [FAKE_JOB.format(py=shlex.quote(sys.executable), out=tmp_path / f"job{i}.json") for i in range(10)]
    jobs.append("echo 'a failing job' && exit 3")
    (tmp_path / "jobs.txt").write_text("\n".join(jobs) + "\n")
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt"),
                           "--gpus", "0", "1", "2", "3", "--logs", str(tmp_path / "logs")],
                          cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("11 jobs on 4 GPUs: 10 done, 1 failed (jobs 11:")
    assert "a failing job" in (tmp_path / "logs" / "job-11.log").read_text()
    runs = [json.loads((tmp_path / f"job{i}.json").read_text()) for i in range(10)]
    assert {r["gpu"] for r in runs} == {"0", "1", "2", "3"}
    for gpu in "0123":
        spans = sorted((r["start"], r["end"]) for r in runs if r["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans  # one at a time
    at_once = max(sum(r["start"] <= t < r["end"] for r in runs) for t in (r["start"] for r in runs))
    assert at_once == 4


def test_missing_runs_of_a_job_list_are_named(tmp_path):
    out = tmp_path / "runs"
    job = (f".venv/bin/python -m w2s_clip_lab.run --data-root data --domain sketch --method weak cpl "
           f"--seeds 0 1 --out-dir {shlex.quote(str(out))}")
    assert [p.relative_to(out).as_posix() for p in grid.expected_results(job)] == [
        "sketch/weak/seed0/results.json", "sketch/cpl/seed0/results.json",
        "sketch/weak/seed1/results.json", "sketch/cpl/seed1/results.json"]
    for method, seed in (("weak", 0), ("cpl", 0), ("weak", 1)):
        put(out, good_result(method, seed))
    assert grid.missing_runs([job]) == {1: [out / "sketch" / "cpl" / "seed1" / "results.json"]}
    (tmp_path / "jobs.txt").write_text(job + "\n")
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--missing", "--jobs",
                           str(tmp_path / "jobs.txt")], cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "sketch/cpl/seed1/results.json" in proc.stdout
    put(out, good_result("cpl", 1))
    assert grid.missing_runs([job]) == {}


def test_the_slurm_script_submits_the_arrays_and_a_tables_job_after_them(tmp_path):
    """With a fake sbatch: this submission's job list is `make jobs`' lines, the log folder exists
    before the arrays are submitted; each array (CHUNK tasks at most) has a time, a throttle, one
    GPU a task, --requeue and its output in that folder; the tables job depends on every array
    (afterany); a task runs its own line of the list from the checkout, and one past the end fails."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                                    f"echo $((1000 + $(wc -l < {calls})))\n")
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "runs"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    variables = [f"OUT={out}", "DOMAINS=sketch clipart", "SEEDS=0 1", "THROTTLE=3", "TIME=02:00:00",
                 "CHUNK=5"]
    proc = subprocess.run(["bash", "w2s_clip_lab/slurm.sh", *variables], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = subprocess.run(["make", "-s", "--no-print-directory", "jobs", *variables], cwd=HERE,
                              capture_output=True, text=True, check=True).stdout
    (jobs,) = (out / "slurm").glob("jobs-*.txt")
    assert jobs.read_text() == expected and (out / "slurm" / "logs").is_dir()
    n = len(expected.splitlines())
    *arrays, tables = calls.read_text().splitlines()
    sizes = [min(5, n - offset) for offset in range(0, n, 5)]
    assert len(arrays) == len(sizes) >= 2
    for k, (array, size) in enumerate(zip(arrays, sizes)):
        for option in (f"--array=1-{size}%3", "--gres=gpu:1", "--time=02:00:00", "--requeue",
                       f"--output={out}/slurm/logs/%A_%a.out", f"--task {HERE} {jobs} {5 * k}"):
            assert option in array, option
    ids = ":".join(str(1001 + k) for k in range(len(arrays)))
    assert f"--dependency=afterany:{ids}" in tables and f"--tables {HERE} {jobs} {out} results" in tables
    assert f"{n} tasks, at most 3 at once each; tables job {1001 + len(arrays)}" in proc.stdout
    fake = tmp_path / "fake-jobs.txt"
    fake.write_text(f"echo one > {tmp_path}/ran\necho two > {tmp_path}/ran\necho three > {tmp_path}/ran\n")
    task = lambda i, offset: subprocess.run(  # noqa: E731  # as SLURM runs a copy, elsewhere
        ["bash", str(HERE / "w2s_clip_lab" / "slurm.sh"), "--task", str(HERE), str(fake), str(offset)],
        cwd=tmp_path, env={**os.environ, "SLURM_ARRAY_TASK_ID": str(i)}, capture_output=True,
        text=True, timeout=60)
    proc = task(1, 1)
    assert proc.returncode == 0 and (tmp_path / "ran").read_text() == "two\n", proc.stderr
    proc = task(3, 1)
    assert proc.returncode == 1 and "has no line 4" in proc.stderr


def test_the_grid_refuses_no_gpu_and_a_gpu_named_twice(tmp_path):
    (tmp_path / "jobs.txt").write_text("true\n")
    for gpus, fragment in ((["0", "0"], "name each GPU once"), (["0,1"], "separated by spaces")):
        proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt"),
                               "--gpus", *gpus], cwd=HERE, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and fragment in proc.stderr
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt")],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no GPU visible" in proc.stderr
    with pytest.raises(SystemExit):
        grid.main(["--jobs", str(tmp_path / "none.txt")])


def test_a_stopped_grid_leaves_no_job_running(tmp_path):
    """SIGTERM to the grid (a closed terminal, kill) stops its jobs as Ctrl-C would and it exits
    130; a job that ignores Ctrl-C is stopped by SIGTERM after the grace time: none is left on a
    GPU without the grid."""
    import signal
    import time
    marker = tmp_path / "alive"
    (tmp_path / "jobs.txt").write_text(f"touch {marker}; sleep 30; echo not stopped > {tmp_path}/late\n")
    grid_proc = subprocess.Popen([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt"),
                                  "--gpus", "0", "--logs", str(tmp_path / "logs")], cwd=HERE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        if marker.exists():
            break
        time.sleep(0.1)
    grid_proc.send_signal(signal.SIGTERM)
    _, err = grid_proc.communicate(timeout=60)
    assert grid_proc.returncode == 130 and "every job stopped" in err
    stubborn = subprocess.Popen(["bash", "-c", "trap '' INT; sleep 30"], start_new_session=True)
    start = time.time()
    grid.stop({"0": (1, stubborn, open(tmp_path / "log", "w"), start)}, grace=0.5)
    assert stubborn.returncode is not None and time.time() - start < 20
    time.sleep(0.5)
    assert not (tmp_path / "late").exists()
