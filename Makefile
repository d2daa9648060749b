# sinet: the pipeline as make targets with real files under artifacts/$(DATASET)/.
# Every stage also checks content fingerprints itself, so a target whose inputs did not
# really change is a no-op that finishes in seconds.

PY        ?= python3
SINET     ?= $(PY) -m sinet_cli
DATASET   ?= demo
DATA      ?= demo
ART       ?= artifacts/$(DATASET)

# demo noise
NOISE      ?= symmetric
NOISE_RATE ?= 0.4
NOISE_SEED ?= 0
DATA_OPTS   = --data $(DATA) --noise $(NOISE) --noise-rate $(NOISE_RATE) --noise-seed $(NOISE_SEED)

# extract-features
BACKBONE   ?= tf_efficientnet_lite0
IMAGE_SIZE ?= 64
BATCH_SIZE ?= 64
DEVICE     ?= auto

.PHONY: install test demo bench clean-demo help
help:
	@echo "make demo   - run the whole pipeline on the embedded demo (installs first)"
	@echo "make test   - run the test suite (installs first)"
	@echo "make bench  - speed/quality benchmarks"

.install.stamp: pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: .install.stamp

test: install
	$(PY) -m pytest -q

$(ART)/features.h5: FORCE | install
	$(SINET) extract-features $(DATA_OPTS) --out $(ART) --backbone $(BACKBONE) --image-size $(IMAGE_SIZE) \
		--batch-size $(BATCH_SIZE) --device $(DEVICE)

demo: $(ART)/features.h5

clean-demo:
	rm -rf artifacts/demo

FORCE:
