# The two commands of README.md. Each makes .venv on first use, installs the project into it, then runs.
#   make train   # trains on the embedded MLflow default (./mlflow.db); ARGS="train.epochs=1" passes overrides
#   make test    # the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pinned to the releases this project is tested with (installable offline here).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
ARGS   ?=

.PHONY: train test install clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

train: install
	@if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  echo "make train: CUDA found, using configs/d2l.yaml"; cfg=configs/d2l.yaml; \
	else \
	  echo "make train: no CUDA, using configs/quick.yaml"; cfg=configs/quick.yaml; \
	fi; \
	$(BIN)/nin-train --config $$cfg $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
