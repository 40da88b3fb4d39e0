# `make demo`: create .venv and run the default experiment.  `make test`: create .venv and run every test.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test test-fast lint clean bench bench-scale bench-trainer gpu-check figures analyze

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch + torchvision first, a pair that matches (a bare `torch` requirement resolved later picks its own build;
	# PyPI torchvision does not import beside the 2.13 CPU wheel, so the pair is 2.14.1 / 0.29.1). TORCH= overrides it.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python run.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src tests run.py

clean:
	rm -rf outputs multirun wandb .pytest_cache

bench: $(STAMP)
	$(BIN)/python benchmarks/variants.py

# `make bench-scale`: a whole LoRA-GA job at 0.25B and 1B, old vs new code path (SIZES=tiny for a smoke check)
SIZES ?= 0.25b,1b
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py --sizes $(SIZES)

# `make bench-trainer`: the default job vs the same job as HF Trainer + PEFT code, one round per seed (SEEDS=0,1,2)
SEEDS ?= 0,1,2
bench-trainer: $(STAMP)
	$(BIN)/python benchmarks/default_vs_trainer.py --seeds $(SEEDS)

gpu-check: $(STAMP)
	PY=$(BIN)/python bash benchmarks/gpu_check.sh

# `make figures`: every experiment under $(RESULTS); EXPERIMENT=<name> narrows it, OUT=<dir> redirects it.
RESULTS ?= results
OUT     ?= figures
EXPERIMENT ?=

analyze: $(STAMP)
	$(BIN)/python -m loralab.analyze --results $(RESULTS) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))

figures: $(STAMP)
	$(BIN)/python -m loralab.figures --results $(RESULTS) --out $(OUT) $(if $(EXPERIMENT),--experiment $(EXPERIMENT))
