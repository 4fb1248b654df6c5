# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
DEMO_FLAGS ?=  # e.g. DEMO_FLAGS="--seed 1 --root outputs/seed1": another draw of every random choice, its own folder
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cython
	# torch and torchvision as one matched pair first (open_clip needs torchvision, and PyPI's torchvision does
	# not import beside the older torch 2.13.0 CPU wheel); a looser requirement would pull whatever is newest.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# youtokentome 1.0.6 only builds with Cython already installed and without build isolation.
	$(PY) -m pip install -q --no-build-isolation youtokentome==1.0.6
	$(PY) -m pip install -q -e '.[dev]'
	# Test-only references for the pretrained tokenizers, without their dependencies: DALL-E 0.1 pins nothing
	# usable (it wants torchvision and mypy), taming-transformers would pull a Lightning its code cannot import.
	$(PY) -m pip install -q --no-deps DALL-E==0.1 taming-transformers-rom1504==0.0.6
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) jobs/demo.py --config $(CONFIG) $(DEMO_FLAGS)

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest

bench: setup
	bash ../shared/peer/install-peer.sh $(PY)
	$(PY) benchmarks/bench_model.py --out benchmarks/results/bench_model.json
	$(PY) benchmarks/bench_paper_shape.py --out benchmarks/results/bench_paper_shape_cpu.json

clean:
	rm -rf $(VENV) outputs
