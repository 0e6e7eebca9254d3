"""`python -m w2s_clip_lab`: the package's commands, one line each (their manual: README.md, docs/)."""
import sys

COMMANDS = {
    "run": "w2s_clip.py's protocol and flags, plus other layouts, caches, Hugging Face weak models, CPE",
    "grid": "run a job list (make jobs) on the GPUs of one node, one job per GPU at a time",
    "miniature": "the synthetic miniature, its tiny CLIP, the pretraining table",
    "ablations": "the faithfulness ablation's table",
    "regret": "the tuning rules judged by their regret",
    "bench": "speed and memory (make bench)",
    "gpu_check": "the GPU path checked on any card (make gpu-check)",
    "weights": "fetch every checkpoint the grid needs, or check them offline (make weights)",
}


def main():
    """Print the commands and how to run them; exit status 0."""
    print("w2s_clip_lab: the package built on w2s_clip.py; each command is python -m w2s_clip_lab.<name>")
    for name, what in COMMANDS.items():
        print(f"  {name:<10} {what}")
    print("Tables: python -m w2s_clip_lab.run --build-tables --out-dir runs --tables-dir results; "
          "a trained head: w2s_clip_lab.load.load_run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
