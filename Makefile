# The two commands of the README: `make demo` and `make test`.
# Each creates its own virtual environment, so they work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo
DEMO_STEPS ?= 300
# Batch 8 (2048 tokens a step): 300 steps are about one pass over the bundled corpus. The whole
# `make demo` (venv, install, training, sample, eval, inspect) took 5 min 8 s on a 2-core Linux VM
# with OpenBLAS (matmul 206 GFLOP/s), 2 min 50 s of it training: enough for text that looks like
# the corpus's and routing that already leans by domain (README, "Quick start").
DEMO_FLAGS ?= --batch-size 8 --eval-every 100

.PHONY: demo test install install-test blas clean

# Debian/Ubuntu: the mlx[cpu] wheel links a slow reference BLAS; tinymoe preloads OpenBLAS
# when it is installed (about 8x faster training). Best effort: everything works without it.
blas:
	@if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1 && \
	  ! ldconfig -p 2>/dev/null | grep -q 'libopenblas.so.0'; then \
	  echo "installing libopenblas0-pthread (fast BLAS for MLX on CPU)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	    ( $$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 ) ) || \
	  echo "note: could not install OpenBLAS; continuing with MLX's bundled BLAS (slower)"; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# An editable install of a package whose parts live in other folders (cli/, presets/) is done with
# an import hook, and setuptools says so in a box of stars ("Editable installation"): information
# with nothing to act on, so that one message (and only it) is filtered out.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

install: blas $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e .

install-test: blas $(BIN)/python
	$(QUIET_EDITABLE) $(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/tinymoe doctor
	$(BIN)/tinymoe train --preset tiny --moe-experts 8 --moe-topk 2 --steps $(DEMO_STEPS) $(DEMO_FLAGS) --out $(DEMO_OUT) --overwrite
	$(BIN)/tinymoe sample $(DEMO_OUT) --prompt "In the beginning" --max-tokens 200 --temperature 0.8 --seed 0
	$(BIN)/tinymoe eval $(DEMO_OUT)
	$(BIN)/tinymoe inspect $(DEMO_OUT)

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
