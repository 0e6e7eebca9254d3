"""Everything built on w2s_clip.py, which runs alone and imports none of it: the package's command
(the file's protocol with other layouts, caches, Hugging Face weak models, CPE and CMM), the
tables, the miniature for the CPU and the tools beside it. Each module imports the file, never
the reverse.

    run        python -m w2s_clip_lab.run: w2s_clip.py's flags and protocol plus the package's hooks
    checks     the thorough preflight: models, checkpoint files, folders, split flags, notes
    files      the file's cache keys, atomic writes, locks and cache readers, named for the package
    datasets   the other layouts (Office-Home, a folder) and the thorough split-file checks
    store      pixel caches, the package's settings, the results files' thorough reader
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
