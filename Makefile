# Two commands a new user needs: `make run` (main job on embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SAMPLE_STAMP := $(VENV)/.sample
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
PIP_INSTALL := $(PIP) install -c requirements/constraints.txt
# MONAI Label pins an old torch; its real imports are listed in requirements/base.in.
MONAILABEL := monailabel==0.8.5

.PHONY: run demo test test-quick lint lint-imports setup sample data prepare lock bench bundle clean

setup: $(STAMP) $(SAMPLE_STAMP)

$(STAMP): pyproject.toml requirements/base.in requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip "setuptools<81" wheel  # pydicom 2.4 needs pkg_resources
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -r requirements/base.in
	$(PIP) install --no-deps $(MONAILABEL)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# The sample study comes from the Python package index (pyradiomics' public chest CT), cached once.
$(SAMPLE_STAMP): $(STAMP)
	$(BIN)/langmamba fetch-sample
	touch $@

# The training CT (lung1 + RIDER + platipy + Lung-PET-CT-Dx + single slices; see weights/data_card.md), checked
# by sha256 and cached once in $LANGMAMBA_DATA or ~/.cache/langmamba/data.
data: $(STAMP)
	$(BIN)/langmamba fetch-data

# The prepared training set of every training and validation case (never lung2): out/prep/training.npz.
prepare: data
	$(BIN)/langmamba prepare out/prep/training.npz

# The MONAI Label server on the sample study (HOST, PORT, STUDIES = folder or DICOMweb URL override it).
# A HOST beyond loopback needs authentication (SECURITY.md) or INSECURE=1, which serves without it.
HOST ?= 127.0.0.1
PORT ?= 8000
STUDIES ?=
INSECURE ?=
run: setup
	$(BIN)/python monailabel_app/serve.py --host $(HOST) --port $(PORT) $(if $(STUDIES),--studies $(STUDIES)) $(if $(filter 1 true yes,$(INSECURE)),--insecure)

# A self-contained MONAI Bundle of the shipped model (weights inside) in out/bundle/.
bundle: setup
	$(BIN)/python monailabel_app/bundle/export.py out/bundle --overwrite

# The low-dose simulation demo (out/demo/).
demo: setup
	$(BIN)/langmamba demo

# The layer contracts of .importlinter (no cycles, networks below checkpoints and training, io and explanations
# apart from training, no front-end imported by the package).
lint-imports: $(STAMP)
	PYTHONPATH=. $(BIN)/lint-imports --no-cache

test: setup
	bash scripts/install_orthanc.sh  # the DICOMweb tests start a real Orthanc (Debian packages)
	$(BIN)/python -m pytest -q

# The fast lane while editing: every test but the slow, server and GPU ones (markers in pyproject.toml).
test-quick: setup
	$(BIN)/python -m pytest -q -m "not slow and not server and not gpu"

# Lint, formatting and types (configured in pyproject.toml); .ci/run runs it before the tests.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/langmamba bench simulate

lock: $(STAMP)
	{ echo "# Pinned versions of every package in the working set (pip freeze of a working .venv; regenerate with 'make lock')."; \
	  $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v -e '^monailabel==' -e '^langmamba'; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
