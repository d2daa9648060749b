# sinet: the pipeline as make targets with real files under artifacts/$(DATASET)/.
#
#   make demo                                   # the whole chain on the embedded demo
#   make all DATASET=imagefolder DATA_ROOT=/data/crawl   # your own crawl: DIR/<class>/*.jpg
#   make all DATASET=clothing1m DATA_ROOT=/data/clothing1m
#   make all DATASET=webvision  DATA_ROOT=/data/webvision
#   make all DATASET=manifest   DATA_ROOT=/data/crawl.tsv CLASSES=/data/classes.tsv
#   make all DATASET=imagefolder DATA_ROOT=/data/crawl  ART=artifacts/shop
#   make cron ART=artifacts/shop NEW=imagefolder:/data/incoming   # extract + score only new images
#
# Each target depends on the artifacts it reads, and each sinet command also checks the
# content fingerprints and parameters it was built from: a stage whose inputs and options did
# not change says "up to date" and does nothing, so a second `make demo` takes seconds and a
# changed parameter reruns only the stages downstream of it.

PY        ?= python3
SINET     ?= $(PY) -m sinet_cli

# ---- dataset -----------------------------------------------------------------------------
DATASET   ?= demo
DATA_ROOT ?=
CLASSES   ?=
# demo noise (ignored by the other readers)
NOISE      ?= symmetric
NOISE_RATE ?= 0.4
NOISE_SEED ?= 0
# demos only: SYNTHETIC captions, e.g. CAPTIONS=synthetic:0.2 (sinet --captions synthetic:W[:E])
CAPTIONS   ?=
# The --data argument. Set with `=`, not `?=`: an unrelated DATA in the environment must not
# replace it (`make all DATA=manifest:x.tsv` on the command line still does).
ifneq ($(filter demo demo-mnist,$(DATASET)),)
  DATA = $(DATASET)
else
  DATA = $(DATASET):$(DATA_ROOT)
endif
ART       ?= artifacts/$(DATASET)
TABLE_OPTS = --data $(DATA) $(if $(CLASSES),--classes $(CLASSES)) --out $(ART)
DATA_OPTS  = $(TABLE_OPTS) --noise $(NOISE) --noise-rate $(NOISE_RATE) --noise-seed $(NOISE_SEED) \
	$(if $(CAPTIONS),--captions $(CAPTIONS))
# Clothing1M follows the paper's table 8 by default: prototypes from the clean train set, weighted
# training on the noisy set, then fine-tuning on the clean set. Set the variables to all / empty
# for the plain setting (every train row).
CLOTHING1M = $(filter clothing1m,$(DATASET))

# ---- build-graph -------------------------------------------------------------------------
SOURCES        ?= wordnet,text
HIERARCHY      ?= auto
TAXONOMY       ?=
STRICT         ?=
HIERARCHY_SIM  ?= path
TEXT_HEAD      ?= none
GRAPH_OPTS     ?=
# ---- extract-features --------------------------------------------------------------------
BACKBONE   ?= tf_efficientnet_lite0
WEIGHTS    ?=
IMAGE_SIZE ?= 64
BATCH_SIZE ?= 64
WORKERS    ?= 2
DEVICE     ?= auto
EXTRACT_OPTS ?=
# ---- make-prototypes (eq. 4-5) -----------------------------------------------------------
TEMPERATURE ?= 0.1
GAMMA       ?= 1.0
WEIGHTING   ?= consistency
PER_CLASS   ?= 1
ROUNDS      ?= 1
PROTOTYPES_FROM ?= $(if $(CLOTHING1M),clean,all)
PROTO_OPTS  ?=
# ---- score-noise (eq. 6; default score: README "Scoring beyond eq. 6") ---------------------
SCORE      ?= fused
ALPHA      ?= 1.2
BETA       ?= 1.5
SCORE_OPTS ?=
# ---- cron re-scoring (sinet rescore): NEW=imagefolder:DIR or NEW=manifest:FILE.tsv --------------
NEW          ?=
WAIT         ?= 0
RESCORE_OPTS ?=
# ---- train (eq. 1) -----------------------------------------------------------------------
ON         ?= features
EPOCHS     ?= 100
SEEDS      ?= 0
# `correct` trains on the cleaned labels (docs/training-modes.md); the clean-label oracle needs known
# true labels: the demos have them
MODES      ?= A B C correct $(if $(filter demo demo-mnist,$(DATASET)),oracle)
# train on the train rows of one subset (all, or e.g. Clothing1M's noisy), then optionally fine-tune
# on another subset's train rows (e.g. clean) for FINETUNE_EPOCHS at FINETUNE_LR (default: last lr)
TRAIN_SUBSET    ?= $(if $(CLOTHING1M),noisy,all)
FINETUNE_SUBSET ?= $(if $(CLOTHING1M),clean)
FINETUNE_EPOCHS ?= 10
FINETUNE_LR     ?=
TRAIN_OPTS ?=
# ---- report ------------------------------------------------------------------------------
LOW_WEIGHT       ?= auto
MAX_CLASSES      ?= 50
REPORT_PER_CLASS ?= 8
THUMB_SIZE       ?= 48
REPORT_OPTS      ?=

.PHONY: help install install-dev test demo all graph features prototypes scores train summary report export cron \
	bench clean-demo data-check FORCE
help:
	@echo "make demo   - run the whole pipeline on the embedded demo (installs first)"
	@echo "make test   - run the test suite (installs first, with the dev extras)"
	@echo "make all DATASET=imagefolder|manifest|clothing1m|webvision|mini-webvision DATA_ROOT=PATH - the chain on a real dataset"
	@echo "make report - the HTML report of artifacts/\$$DATASET (after the chain)"
	@echo "make export - every scored image as CSV/Parquet and a cleaned manifest, in artifacts/\$$DATASET/export"
	@echo "make cron ART=artifacts/NAME NEW=imagefolder:DIR|manifest:FILE - extract and score only newly crawled images"
	@echo "make bench  - speed/quality benchmarks against baselines timed in the same run (BENCH_OPTS=--quick: smoke run)"

# Two stamps: .install.stamp = installed with the dev extras (pytest, cleanlab, scikit-learn), what
# `make test` needs; .install-run.stamp = installed to run the pipeline (`make all`, `make demo`),
# which a current dev install also satisfies. A run install never satisfies `make test`.
.install.stamp: pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

.install-run.stamp: pyproject.toml
	@if [ -f .install.stamp ] && [ .install.stamp -nt pyproject.toml ]; then :; \
	else echo "$(PY) -m pip install -q -e ."; $(PY) -m pip install -q -e . || exit 1; fi
	@touch $@

install: .install-run.stamp
install-dev: .install.stamp

test: install-dev
	$(PY) -m pytest -q

data-check:
	@case "$(DATA)" in *:) echo "make: DATASET=$(DATASET) reads DATA_ROOT=PATH (the dataset folder or manifest)" >&2; exit 2;; esac

# Real file targets. FORCE makes make ask sinet, which decides by content fingerprints.
$(ART)/graph.h5: FORCE | install data-check
	$(SINET) build-graph $(TABLE_OPTS) --sources $(SOURCES) --hierarchy $(HIERARCHY) \
		$(if $(TAXONOMY),--taxonomy $(TAXONOMY)) $(if $(filter 1 yes true,$(STRICT)),--strict) \
		--hierarchy-sim $(HIERARCHY_SIM) --text-head $(TEXT_HEAD) $(GRAPH_OPTS)

$(ART)/features.h5: FORCE | install data-check
	$(SINET) extract-features $(DATA_OPTS) --backbone $(BACKBONE) $(if $(WEIGHTS),--weights $(WEIGHTS)) \
		--image-size $(IMAGE_SIZE) --batch-size $(BATCH_SIZE) --workers $(WORKERS) --device $(DEVICE) $(EXTRACT_OPTS)

$(ART)/prototypes.h5: $(ART)/features.h5 $(ART)/graph.h5 FORCE
	$(SINET) make-prototypes --out $(ART) --temperature $(TEMPERATURE) --gamma $(GAMMA) \
		--weighting $(WEIGHTING) --per-class $(PER_CLASS) --rounds $(ROUNDS) --device $(DEVICE) \
		$(if $(filter-out all,$(PROTOTYPES_FROM)),--prototypes-from $(PROTOTYPES_FROM)) $(PROTO_OPTS)

$(ART)/scores.h5: $(ART)/prototypes.h5 FORCE
	$(SINET) score-noise --out $(ART) --score $(SCORE) --alpha $(ALPHA) --beta $(BETA) --device $(DEVICE) $(SCORE_OPTS)

$(ART)/metrics.json: $(ART)/scores.h5 FORCE
	for seed in $(SEEDS); do for mode in $(MODES); do \
		$(SINET) train $(DATA_OPTS) --on $(ON) --mode $$mode --epochs $(EPOCHS) --seed $$seed \
			$(if $(filter-out 0,$(SEEDS)),--suffix seed$$seed) --device $(DEVICE) \
			$(if $(filter-out all,$(TRAIN_SUBSET)),--train-subset $(TRAIN_SUBSET)) \
			$(if $(FINETUNE_SUBSET),--finetune-subset $(FINETUNE_SUBSET) --finetune-epochs $(FINETUNE_EPOCHS) \
				$(if $(FINETUNE_LR),--finetune-lr $(FINETUNE_LR))) $(TRAIN_OPTS) || exit 1; \
	done; done

graph: $(ART)/graph.h5
features: $(ART)/features.h5
prototypes: $(ART)/prototypes.h5
scores: $(ART)/scores.h5
train: $(ART)/metrics.json

summary: $(ART)/metrics.json
	$(SINET) summary --out $(ART)

$(ART)/report/index.html: $(ART)/metrics.json FORCE
	$(SINET) report --out $(ART) --low-weight $(LOW_WEIGHT) --max-classes $(MAX_CLASSES) \
		--per-class $(REPORT_PER_CLASS) --thumb-size $(THUMB_SIZE) $(REPORT_OPTS)

report: $(ART)/report/index.html

# every scored image as CSV and Parquet, and a cleaned manifest (--data manifest: reads it back)
$(ART)/export/images.csv: $(ART)/scores.h5 FORCE
	$(SINET) export --data $(DATA) --out $(ART)

export: $(ART)/export/images.csv

# summary last: the numbers and the paths of the outputs are what a run ends with
all: report export summary

# Cron: append the features of images of NEW not yet in $(ART)/features.h5 and score them against
# the existing prototypes. Deliberately no prerequisites: it never rebuilds the chain.
cron:
	@test -n "$(NEW)" || { echo "make: cron needs NEW=imagefolder:DIR or NEW=manifest:FILE.tsv" >&2; exit 2; }
	$(SINET) rescore --data $(NEW) $(if $(CLASSES),--classes $(CLASSES)) --out $(ART) --wait $(WAIT) \
		--batch-size $(BATCH_SIZE) --workers $(WORKERS) --device $(DEVICE) $(if $(CAPTIONS),--captions $(CAPTIONS)) \
		$(RESCORE_OPTS)

demo: all

# BENCH_OPTS: e.g. --quick (small sizes), --only prototypes,score, --device cuda
BENCH_OPTS ?=
bench: install-dev
	$(PY) bench/run_all.py $(BENCH_OPTS)

clean-demo:
	rm -rf artifacts/demo

FORCE:
