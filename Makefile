# sd-plugin: `make demo` runs the offline demo, `make test` the test suite.
# Both create .venv and install the project (and its dependencies) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pair that timm needs; override e.g. TORCH_SPEC="torch torchvision".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.sd-plugin-installed

.PHONY: install demo test test-slow test-real-data lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m sd_plugin demo --output-dir outputs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The tests that need Debian's dataset-fashion-mnist (they skip in `make test` without it).
test-real-data: $(STAMP)
	$(PY) -m pytest -q -m 'fashion_mnist and not slow'

lint: $(STAMP)
	$(PY) -m ruff check sd_plugin tests benchmarks recipes
	$(PY) -m ruff format --check sd_plugin tests benchmarks recipes

clean:
	rm -rf outputs trainer_output .pytest_cache
