# Two entry points for a fresh machine; each builds .venv/ by itself.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The factory's main job on the embedded default corpus and target.
demo: $(STAMP)
	if [ -f runs/demo/job.json ]; then $(VENV)/bin/factory run --resume runs/demo; \
	else $(VENV)/bin/factory run --target laptop-cpu --preset quick --out runs/demo; fi

# The test suite (what CI runs).
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -x --durations=15

clean:
	rm -rf $(VENV) runs
