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


def test_the_slurm_script_submits_the_array_and_a_tables_job_after_it(tmp_path):
    """With a fake sbatch: the job list is `make jobs`' lines, the log folder exists before the
    array is submitted, the array has a time, a throttle, one GPU a task, --requeue and its output
    in that folder, the tables job depends on the array (afterany); a task runs its own line."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n"
                                    f"echo $((1000 + $(wc -l < {calls})))\n")
    (bin_dir / "sbatch").chmod(0o755)
    out = tmp_path / "runs"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    variables = [f"OUT={out}", "DOMAINS=sketch", "SEEDS=0 1", "THROTTLE=3", "TIME=02:00:00"]
    proc = subprocess.run(["bash", "w2s_clip_lab/slurm.sh", *variables], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = subprocess.run(["make", "-s", "jobs", *variables], cwd=HERE, capture_output=True,
                              text=True, check=True).stdout
    jobs = out / "slurm" / "jobs.txt"
    assert jobs.read_text() == expected and (out / "slurm" / "logs").is_dir()
    n = len(expected.splitlines())
    array, tables = calls.read_text().splitlines()
    for option in (f"--array=1-{n}%3", "--gres=gpu:1", "--time=02:00:00", "--requeue",
                   f"--output={out}/slurm/logs/%A_%a.out", f"--task {jobs}"):
        assert option in array, option
    assert "--dependency=afterany:1001" in tables and f"--tables {jobs} {out}" in tables
    assert f"array 1001: {n} tasks, at most 3 at once; tables job 1002" in proc.stdout
    fake = tmp_path / "fake-jobs.txt"
    fake.write_text(f"echo one > {tmp_path}/ran\necho two > {tmp_path}/ran\n")
    task = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2", "SLURM_SUBMIT_DIR": str(HERE)}
    proc = subprocess.run(["bash", str(HERE / "w2s_clip_lab" / "slurm.sh"), "--task", str(fake)],
                          cwd=tmp_path, env=task, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and (tmp_path / "ran").read_text() == "two\n", proc.stderr


def test_the_grid_refuses_no_gpu_and_a_gpu_named_twice(tmp_path):
    (tmp_path / "jobs.txt").write_text("true\n")
    for gpus, fragment in ((["0", "0"], "names a GPU twice"),):
        proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt"),
                               "--gpus", *gpus], cwd=HERE, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and proc.stderr.startswith("error: ") and fragment in proc.stderr
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "w2s_clip_lab.grid", "--jobs", str(tmp_path / "jobs.txt")],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no GPU visible" in proc.stderr
    with pytest.raises(SystemExit):
        grid.main(["--jobs", str(tmp_path / "none.txt")])
