# llama-tracer: `make lab` opens the notebooks, `make test` runs everything CI runs.
VENV   := .venv
PY     := $(VENV)/bin/python
PROMPT ?= It is a truth universally acknowledged

.PHONY: setup test lab trace bench clean distclean

setup:
	bash scripts/setup.sh

test: setup
	$(VENV)/bin/ruff check tracer tests benchmarks examples tools
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED - pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

# Jupyter refuses to run as root unless told; containers often are root.
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

trace: setup
	$(PY) -m tracer trace --prompt "$(PROMPT)" --out artifacts/trace-demo

bench: setup
	$(PY) -m benchmarks.speed --device cpu --model embedded

clean:
	rm -rf artifacts .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
