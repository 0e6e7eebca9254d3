"""Everything around the method of w2s_clip.py, which imports none of it: the runner of its
command line and what the runner uses, the miniature for the CPU and the tools beside it.

    runner     python w2s_clip.py: preflight, pending runs, weak stage, features, methods, save, box
    checks     flags, models, checkpoint files, images and the device, checked before any work
    files      cache keys, atomic writes, locks, cache files read back
    datasets   split files, image loading, the other layouts (Office-Home, a folder)
    store      the cached stages, each run's settings, the results files and their one reader
    report     Tables 2-4, Figure 2, the differences, the box a run prints
    hf         Hugging Face weak models (--weak-model hf:<id>)
    cpe        CMM and CPE prototypes (the worst-categories paper)
    weights    the weights `make weights` fetches, and the offline check
    miniature  python -m w2s_clip_lab.miniature: the synthetic miniature and its tiny CLIP
    ablations  python -m w2s_clip_lab.ablations: the faithfulness ablation's table
    regret     python -m w2s_clip_lab.regret: the tuning rules judged by regret
    bench      python -m w2s_clip_lab.bench: speed and memory (make bench)
    gpu_check  python -m w2s_clip_lab.gpu_check: the GPU check (make gpu-check)
"""
