# w2s_clip: weak-to-strong generalization for CLIP classification (CPL). `make help` lists targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The package's command: w2s_clip.py's flags and protocol, plus other layouts, caches, CPE (README).
RUN := $(PY) -m w2s_clip_lab.run
export HF_HUB_OFFLINE ?= 0

DOMAIN ?= sketch
# DATASET=officehome (DATA=its folder) or folder (DOMAINS=your domains): the same grid on other data.
DATASET ?= domainnet
ifeq ($(DATASET),officehome)
DOMAINS ?= Art Clipart Product Real_World
T3_DOMAIN ?= Clipart
else
DOMAINS ?= clipart infograph painting quickdraw real sketch
T3_DOMAIN ?= $(if $(filter clipart,$(DOMAINS)),clipart,$(firstword $(DOMAINS)))
endif
SEEDS ?= 0 1 2 3 4
DATA ?= data/domainnet
OUT ?= runs
CACHE ?= cache
TABLES ?= results
FLAGS ?=
# Table 3's weak models: the paper's five, by their Hugging Face ids (needs transformers).
WEAK_MODELS ?= hf:microsoft/resnet-18 hf:microsoft/resnet-26 hf:microsoft/resnet-34 \
	hf:microsoft/cvt-13 hf:facebook/convnext-tiny-224
# Table 3 needs no cpl-text; the ceiling is rerun so that each column has its PGR. lp and tp:
# every baseline of w2s_clip.py's LOSSES with that head.
T3_METHODS := weak zero-shot ceiling lp tp cpl
DOMAINNET := http://csr.bu.edu/ftp/visda/2019/multi-source

# The demo: a synthetic miniature DomainNet and a tiny CLIP pretrained on it for DEMO_PRETRAIN
# steps (w2s_clip_lab/miniature.py), a tiny random-init weak model, on the CPU with DEMO_THREADS threads.
# DEMO_REGIME=paper (default): 30 classes in the paper's budget (Table 1's images per class, its
# batch per class and epochs), Table 2's weak and ceiling and CLIP's zero-shot per domain;
# paper-10class: the ten-class preset of earlier versions; easy: the first miniature, in
# $(DEMO)/easy for make demo-tuning. DEMO_TEST: D_test images per class (default: the preset's).
DEMO := demo
DEMO_REGIME ?= paper
DEMO_PRETRAIN ?= 1000
DEMO_TEST ?=
DEMO_THREADS ?= 1
# make demo runs its seeds, demo-tables its one-domain jobs, DEMO_JOBS at a time (each on
# DEMO_THREADS threads): the same runs, files and cells as one after another, in about half the
# wall time on 2 cores.
DEMO_JOBS ?= 2
# The CPU kernels pinned to AVX2 in PyTorch's own code, MKL and oneDNN, so that another x86-64 CPU
# computes the same floats as this one (docs/miniature.md, "Threads and knobs").
DEMO_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(DEMO_THREADS) ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 \
	ONEDNN_MAX_CPU_ISA=AVX2
demo_data = $(DEMO_ENV) $(PY) -m w2s_clip_lab.miniature --out $(1) --regime $(2) \
	$(if $(DEMO_TEST),--test-per-class $(DEMO_TEST)) --pretrain-steps $(3)
# Each preset's batch and epochs. paper: the paper's, one --batch-size for the weak model and the
# heads as in §5, at 512/345 images per class per step (45 at 30 classes), 10 head and 3 weak
# epochs; the weak model at its images' 32 px (deviation 26). The ten-class presets: earlier versions'.
demo_run_paper := --batch-size 45 --strong-epochs 10 --weak-epochs 3 --weak-input-size 32
demo_run_easy := --batch-size 32 --strong-epochs 20 --weak-epochs 5
demo_run_paper-10class := $(demo_run_easy)
demo_flags = --dataset folder --data-root $(1)/data --clip-model $(1)/tiny-clip.json \
	--clip-pretrained $(1)/tiny-clip-$(DEMO_PRETRAIN)steps.pt \
	--weak-model test_resnet --no-weak-pretrained $(demo_run_$(2)) --workers 0 --device cpu \
	--cache-dir $(1)/cache
DEMO_FLAGS := $(call demo_flags,$(DEMO),$(DEMO_REGIME))
DEMO_WEAK_MODELS := test_resnet test_byobnet test_efficientnet test_vit test_convnext
DEMO_SEEDS ?= 0 1 2 3 4
# The easy preset's level of make demo-tuning: its two seeds, as first measured.
DEMO_EASY_SEEDS ?= 0 1
# The faithfulness ablation: the paper's defaults, then one flag changed at a time (flag=value).
ABLATIONS := paper tune=none tune-by=weak-kl select-from=start-and-epochs ceiling-data=hold-train cpl-kl=printed \
	cpl-logit-scale=100 prototype-norm=unit lp-input=normalized lr-schedule=cosine max-grad-norm=0 \
	select-by=agreement
ABLATION_METHODS ?= weak zero-shot ceiling kd-lp adaptconf-lp cpl
ABLATION_DOMAINS ?= clipart
ablation_flags = $$([ $$a = paper ] || echo "--$${a%%=*} $${a\#*=}")

DEMO_METHODS := weak zero-shot ceiling kd-lp ce-tp kd-tp cpl
# The pretraining axis: the same grid with the strong model pretrained for these many steps
# (demo), or with these ViT-B-32 checkpoints (GPU, DomainNet's DOMAIN).
DEMO_PRETRAIN_AXIS ?= 0 10 20 30 50 100 $(DEMO_PRETRAIN)
# On infograph, where the paper preset's zero-shot crosses its weak model within the axis; the LP
# baselines, CE-TP and CPL (the TP losses' grids would treble the cost).
DEMO_PT_DOMAIN ?= infograph
DEMO_PT_METHODS ?= weak zero-shot ceiling ce-lp kd-lp ce-tp cpl
PT_TAGS ?= datacomp_s_s13m_b4k datacomp_m_s128m_b4k datacomp_xl_s13b_b90k openai
PT_METHODS := $(T3_METHODS)

.PHONY: help venv test demo data data-all paper-tables grid tables demo-tables demo-calibrate demo-regimes demo-pretraining \
	pretraining-table ablations demo-ablations demo-tuning gpu-check weights jobs bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## create .venv with requirements-lab.txt (the file's requirements.txt and the package's)

# Another torch build than PyPI's (CUDA 13: Turing to Blackwell, driver R580+): e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cu126 (a V100, or an older driver) or .../whl/cpu.
TORCH_INDEX ?=
$(VENV)/.installed: requirements.txt requirements-lab.txt
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) \
	  $$(grep -E '^torch(vision)?==' requirements.txt | cut -d' ' -f1))
	$(PY) -m pip install -q -r requirements-lab.txt
	touch $@

# test_w2s_clip.py runs beside a copy of w2s_clip.py alone (a w2s_clip_lab/ there raises on
# import: nothing of the project can hide a dependency), in a temporary folder; then tests/.
test: venv ## run the unit tests (CPU, no download): the file's alone, then the package's
	@alone=$$(mktemp -d) && trap 'rm -rf "$$alone"' EXIT && mkdir "$$alone/w2s_clip_lab" && \
	  echo "raise ImportError('w2s_clip.py must run alone')" > "$$alone/w2s_clip_lab/__init__.py" && \
	  cp w2s_clip.py test_w2s_clip.py "$$alone/" && cd "$$alone" && \
	  HF_HUB_OFFLINE=1 $(abspath $(PY)) -m pytest -q -p no:cacheprovider test_w2s_clip.py
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# Each seed's output is printed whole when it ends (the same runs and numbers as one command with
# --seeds $(DEMO_SEEDS)).
demo: venv ## the miniature on the CPU, no download: data, a tiny CLIP pretrained on the spot, runs, tables (about 2 minutes on 2 cores)
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN))
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=target $(addprefix demo-seed-,$(DEMO_SEEDS))
	@echo "--- both seeds (the same command finds their runs) ---"
	@$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain sketch --method $(DEMO_METHODS) --seeds $(DEMO_SEEDS) \
	  --out-dir $(DEMO)/runs
	$(DEMO_ENV) $(RUN) --build-tables --out-dir $(DEMO)/runs --tables-dir $(DEMO)/tables

data: ## download and unpack DomainNet's DOMAIN (default sketch) and its split files into DATA
	mkdir -p $(DATA)
	case $(DOMAIN) in clipart|painting) url=$(DOMAINNET)/groundtruth/$(DOMAIN).zip;; \
	  *) url=$(DOMAINNET)/$(DOMAIN).zip;; esac; \
	  curl -fL --retry 3 -C - -o $(DATA)/$(DOMAIN).zip $$url
	for s in train test; do \
	  curl -fL --retry 3 -o $(DATA)/$(DOMAIN)_$$s.txt $(DOMAINNET)/domainnet/txt/$(DOMAIN)_$$s.txt; done
	cd $(DATA) && unzip -q -o $(DOMAIN).zip && rm $(DOMAIN).zip

data-all: ## download all DOMAINS (about 18 GB of archives) for make paper-tables
	for d in $(DOMAINS); do $(MAKE) data DOMAIN=$$d DATA=$(DATA) || exit 1; done

weights: venv ## fetch every checkpoint the grid needs (network) into the standard caches; print sizes
	$(PY) -m w2s_clip_lab.weights --clip-tags $(PT_TAGS) --weak-models resnet18 $(WEAK_MODELS)

paper-tables: venv ## run the full grid of Tables 2-4 (GPU, DomainNet or DATASET=...), then build the tables
	for d in $(DOMAINS); do \
	  $(RUN) --dataset $(DATASET) --data-root $(DATA) --domain $$d --method all \
	    --seeds $(SEEDS) --out-dir $(OUT) --cache-dir $(CACHE) $(FLAGS) || exit 1; done
	for w in $(filter-out resnet18,$(WEAK_MODELS)); do \
	  $(RUN) --dataset $(DATASET) --data-root $(DATA) --domain $(T3_DOMAIN) \
	    --method $(T3_METHODS) --seeds $(SEEDS) --weak-model $$w \
	    --out-dir "$(OUT)/weak-$$(echo $$w | tr ':/' '--')" --cache-dir $(CACHE) $(FLAGS) || exit 1; done
	for d in $(DOMAINS); do for i in ensemble cpe; do \
	  $(RUN) --dataset $(DATASET) --data-root $(DATA) --domain $$d --method zero-shot cpl \
	    --prototype-init $$i --seeds $(SEEDS) --out-dir $(OUT)/$$i-init \
	    --cache-dir $(CACHE) $(FLAGS) || exit 1; done; done
	$(MAKE) tables

# A path as the shell reads it back: in single quotes (a path with spaces stays one argument).
q = '$(subst ','"'"',$(1))'
jobs: ## print paper-tables' grid as one command per line, to run in any order and concurrently
	@for d in $(DOMAINS); do for s in $(SEEDS); do \
	  echo "$(RUN) $(FLAGS) --dataset $(DATASET) --data-root $(call q,$(DATA)) --domain $$d --method all --seeds $$s --out-dir $(call q,$(OUT)) --cache-dir $(call q,$(CACHE))"; \
	done; done
	@for w in $(filter-out resnet18,$(WEAK_MODELS)); do for s in $(SEEDS); do \
	  echo "$(RUN) $(FLAGS) --dataset $(DATASET) --data-root $(call q,$(DATA)) --domain $(T3_DOMAIN) --method $(T3_METHODS) --seeds $$s --weak-model $$w --out-dir $(call q,$(OUT)/weak-)$$(echo $$w | tr ':/' '--') --cache-dir $(call q,$(CACHE))"; \
	done; done
	@for d in $(DOMAINS); do for i in ensemble cpe; do for s in $(SEEDS); do \
	  echo "$(RUN) $(FLAGS) --dataset $(DATASET) --data-root $(call q,$(DATA)) --domain $$d --method zero-shot cpl --prototype-init $$i --seeds $$s --out-dir $(call q,$(OUT)/)$$i-init --cache-dir $(call q,$(CACHE))"; \
	done; done; done

GPUS ?= 0
grid: venv ## run make jobs' grid on this node's GPUS ("0 1 2 3"), one job per GPU at a time, then the tables
	mkdir -p $(call q,$(OUT))
	$(MAKE) -s --no-print-directory jobs > $(call q,$(OUT)/jobs.txt)
	status=0; $(PY) -m w2s_clip_lab.grid --jobs $(call q,$(OUT)/jobs.txt) --gpus $(GPUS) \
	  --logs $(call q,$(OUT)/logs) || status=$$?; \
	  $(PY) -m w2s_clip_lab.run --build-tables --out-dir $(call q,$(OUT)) --tables-dir $(call q,$(TABLES)) \
	  && exit $$status

tables: venv ## build Tables 2-4, Figure 2 and paper_gap.md from the results under OUT
	$(RUN) --build-tables --out-dir $(OUT) --tables-dir $(TABLES)

demo-tables: venv ## Tables 2-4 and Figure 2 on six synthetic domains, CPU (make demo-pretraining: its table)
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN))
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line $(addprefix demo-t2-,$(DOMAINS)) \
	  $(addprefix demo-t3-,$(filter-out test_resnet,$(DEMO_WEAK_MODELS))) \
	  $(foreach i,ensemble cpe,$(addprefix demo-t4-$(i)-,$(DOMAINS)))
	$(MAKE) tables OUT=$(DEMO)/tables-runs TABLES=$(DEMO)/results

# The paper preset's calibration: only weak, zero-shot and ceiling (no weak-to-strong method), into
# demo-tables' own folder (its runs are kept), and the table of targets, results and knobs.
demo-calibrate: venv ## the paper preset against Table 2 and CLIP's zero-shot -> demo/results/calibration.md
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN))
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line $(addprefix demo-cal-,$(DOMAINS))
	$(PY) -m w2s_clip_lab.miniature --calibration-table $(addprefix $(DEMO)/tables-runs/,$(DOMAINS)) \
	  --regime $(DEMO_REGIME) \
	  --tables-dir $(DEMO)/results

demo-cal-%:  # one domain of demo-calibrate
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $* --method weak zero-shot ceiling \
	  --seeds $(DEMO_SEEDS) --out-dir $(DEMO)/tables-runs

demo-seed-%:  # one seed of make demo
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain sketch --method $(DEMO_METHODS) \
	  --seeds $* --out-dir $(DEMO)/runs
demo-t2-%:  # one domain of demo-tables' Table 2
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $* --method all \
	  --seeds $(DEMO_SEEDS) --out-dir $(DEMO)/tables-runs
demo-t3-%:  # one weak model of demo-tables' Table 3, on clipart
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain clipart --method $(T3_METHODS) \
	  --seeds $(DEMO_SEEDS) --weak-model $* --out-dir $(DEMO)/tables-runs/weak-$*
demo-t4-%:  # one initialisation-domain pair of demo-tables' Table 4 (ensemble-clipart, ...)
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $(lastword $(subst -, ,$*)) \
	  --method zero-shot cpl --prototype-init $(firstword $(subst -, ,$*)) --seeds $(DEMO_SEEDS) \
	  --out-dir $(DEMO)/tables-runs/$(firstword $(subst -, ,$*))-init

ablations: venv ## CPL and two baselines under each alternative to the paper's choices (GPU, DomainNet)
	for d in $(ABLATION_DOMAINS); do for a in $(ABLATIONS); do \
	  $(RUN) --dataset $(DATASET) --data-root $(DATA) --domain $$d --method $(ABLATION_METHODS) --seeds $(SEEDS) \
	    --out-dir $(OUT)/ablations/$$a --cache-dir $(CACHE) $(FLAGS) $(ablation_flags) || exit 1; \
	done; done
	$(PY) -m w2s_clip_lab.ablations --out-dir $(OUT)/ablations --output $(TABLES)/ablations.md

demo-ablations: venv ## the same ablation on the demo's synthetic sketch domain, CPU, no download
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN))
	for a in $(ABLATIONS); do \
	  $(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain sketch --method $(ABLATION_METHODS) \
	    --seeds $(DEMO_SEEDS) --out-dir $(DEMO)/ablations/$$a $(ablation_flags) || exit 1; done
	$(PY) -m w2s_clip_lab.ablations --out-dir $(DEMO)/ablations --output $(DEMO)/results/ablations.md

# Tuning rules judged by regret: the tuned methods with --tune hold-val on every domain of both
# presets; each run records every rule's hold-val score and every grid point's D'_test accuracy.
# The paper preset's runs are demo-tables' own (a finished run is skipped), the easy preset's go to
# $(DEMO)/tuning/easy; one job per preset and domain, DEMO_JOBS at a time.
TUNING_METHODS := kd-lp auxconf-lp adaptconf-lp kd-tp auxconf-tp adaptconf-tp cpl cpl-text
demo-tuning: venv ## the tuning rules' regret, both presets, six domains -> demo/results/tuning_regret.md
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN))
	$(call demo_data,$(DEMO)/easy,easy,$(DEMO_PRETRAIN))
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line \
	  $(addprefix demo-tune-paper-,$(DOMAINS)) $(addprefix demo-tune-easy-,$(DOMAINS))
	$(PY) -m w2s_clip_lab.regret --levels paper=$(DEMO)/tables-runs easy=$(DEMO)/tuning/easy \
	  --output $(DEMO)/results/tuning_regret.md

demo-tune-paper-%:  # one domain of demo-tuning, paper preset (demo-tables' runs)
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $* --method $(TUNING_METHODS) \
	  --seeds $(DEMO_SEEDS) --tune hold-val --out-dir $(DEMO)/tables-runs
demo-tune-easy-%:  # one domain of demo-tuning, easy preset
	$(DEMO_ENV) $(RUN) $(call demo_flags,$(DEMO)/easy,easy) --domain $* \
	  --method $(TUNING_METHODS) --seeds $(DEMO_EASY_SEEDS) --tune hold-val --out-dir $(DEMO)/tuning/easy

# The regime map (its own time, outside make test): on DEMO_MAP_DOMAIN, the same methods and seeds
# with every head trained on the first N hold-train images of each class (D'_test, hold-val and the
# weak model unchanged; the batch stays the paper's per class), and with the tiny CLIP pretrained for
# fewer steps (zero-shot − weak). The full level of both axes is demo-tables' own runs.
DEMO_MAP_DOMAIN ?= sketch
DEMO_MAP_IMAGES ?= 4 8 16 24 32
DEMO_MAP_PRETRAIN ?= 0 100 200 300 500
DEMO_MAP_METHODS ?= weak zero-shot ceiling lp tp cpl
demo-regimes: venv ## CPL − best baseline by images per class and by zero-shot − weak -> demo/results/regimes.{md,png}
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_MAP_PRETRAIN) $(DEMO_PRETRAIN))
	$(MAKE) --no-print-directory -j$(DEMO_JOBS) --output-sync=line demo-map-full \
	  $(addprefix demo-map-images-,$(DEMO_MAP_IMAGES)) $(addprefix demo-map-pretrain-,$(DEMO_MAP_PRETRAIN))
	$(DEMO_ENV) $(PY) -m w2s_clip_lab.miniature --tables-dir $(DEMO)/results --regime-map \
	  $(foreach n,$(DEMO_MAP_IMAGES),images:$(n)=$(DEMO)/regimes/images-$(n)) \
	  images:all=$(DEMO)/tables-runs/$(DEMO_MAP_DOMAIN) \
	  $(foreach s,$(DEMO_MAP_PRETRAIN),pretraining:$(s)=$(DEMO)/regimes/pretrain-$(s)) \
	  pretraining:$(DEMO_PRETRAIN)=$(DEMO)/tables-runs/$(DEMO_MAP_DOMAIN)

demo-map-full:  # the full level of demo-regimes: demo-tables' runs (a finished run is skipped)
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $(DEMO_MAP_DOMAIN) --method $(DEMO_MAP_METHODS) \
	  --seeds $(DEMO_SEEDS) --out-dir $(DEMO)/tables-runs
demo-map-images-%:  # one images-per-class level of demo-regimes
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --domain $(DEMO_MAP_DOMAIN) --method $(DEMO_MAP_METHODS) \
	  --seeds $(DEMO_SEEDS) --hold-train-per-class $* --out-dir $(DEMO)/regimes/images-$*
demo-map-pretrain-%:  # one pretraining level of demo-regimes
	$(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --clip-pretrained $(DEMO)/tiny-clip-$*steps.pt \
	  --domain $(DEMO_MAP_DOMAIN) --method $(DEMO_MAP_METHODS) --seeds $(DEMO_SEEDS) \
	  --out-dir $(DEMO)/regimes/pretrain-$*

demo-pretraining: venv ## the pretraining table and figure on the miniature: DEMO_PRETRAIN_AXIS steps -> demo/results/pretraining.{md,png}
	$(call demo_data,$(DEMO),$(DEMO_REGIME),$(DEMO_PRETRAIN_AXIS))
	for s in $(DEMO_PRETRAIN_AXIS); do \
	  $(DEMO_ENV) $(RUN) $(DEMO_FLAGS) --clip-pretrained $(DEMO)/tiny-clip-$${s}steps.pt \
	    --domain $(DEMO_PT_DOMAIN) --method $(DEMO_PT_METHODS) --seeds $(DEMO_SEEDS) \
	    --out-dir $(DEMO)/pretraining-runs/$$s || exit 1; done
	$(DEMO_ENV) $(PY) -m w2s_clip_lab.miniature --tables-dir $(DEMO)/results --pretraining-table \
	  $(foreach s,$(DEMO_PRETRAIN_AXIS),"$(s) steps=$(DEMO)/pretraining-runs/$(s)")

pretraining-table: venv ## CPL vs the amount of CLIP pretraining: ViT-B-32 with PT_TAGS on DOMAIN (GPU)
	for t in $(PT_TAGS); do \
	  $(RUN) --dataset $(DATASET) --data-root $(DATA) --domain $(DOMAIN) --clip-model ViT-B-32 \
	    --clip-pretrained $$t --method $(PT_METHODS) --seeds $(SEEDS) \
	    --out-dir $(OUT)/pretraining/$$t --cache-dir $(CACHE) $(FLAGS) || exit 1; done
	$(PY) -m w2s_clip_lab.miniature --tables-dir $(TABLES) --pretraining-table \
	  $(foreach t,$(PT_TAGS),$(t)=$(OUT)/pretraining/$(t))

DEVICE ?=
gpu-check: venv ## self-check of the GPU path, no network, no data (DEVICE=cuda:1; DEVICE=cpu: the dry run)
	HF_HUB_OFFLINE=1 $(PY) -m w2s_clip_lab.gpu_check $(if $(DEVICE),--device $(DEVICE))

bench: venv ## speed and memory benchmark (any device; CPU by default here)
	HF_HUB_OFFLINE=1 $(PY) -m w2s_clip_lab.bench $(FLAGS)

clean: ## remove what the demo and the tests made (keeps .venv, data, cache, runs and results)
	rm -rf $(DEMO) .pytest_cache __pycache__ w2s_clip_lab/__pycache__ tests/__pycache__
