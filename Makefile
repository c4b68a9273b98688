# The README's Quick start: `make app` and `make test`. Each does its own set-up into .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DATA := data/demo
DEMO_BUNDLE := data/demo-bundle
BUNDLE ?= $(DEMO_BUNDLE)
PORT ?= 8501
ADDRESS ?= 127.0.0.1
export HF_HUB_OFFLINE ?= 1

.PHONY: app test test-slow lint demo install browser clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Synthetic demo frames and a small demo bundle, built once when missing.
$(DEMO_DATA)/manifest.csv: | $(STAMP)
	$(BIN)/painwatch demo-data $(DEMO_DATA)

$(DEMO_BUNDLE)/model.json: | $(DEMO_DATA)/manifest.csv
	$(BIN)/painwatch demo-bundle --data $(DEMO_DATA) --out $(DEMO_BUNDLE)

demo: $(DEMO_BUNDLE)/model.json

# The demo bundle is built only when the app is to show it (BUNDLE not given).
app: $(STAMP) $(if $(filter $(DEMO_BUNDLE),$(BUNDLE)),demo)
	$(BIN)/streamlit run app.py --server.address $(ADDRESS) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false -- --bundle $(BUNDLE)

# Debian's chromium for the browser tests; without root the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q chromium >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)) ; } || \
		echo "chromium is not installed and could not be installed: browser tests will skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check painwatch app.py scripts tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
