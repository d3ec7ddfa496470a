# l7lb: `make demo` runs the example, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= conf/demo.ini
DEMO_PORTS := 8081 8082 8083 8084

.PHONY: demo test install lint typecheck unit bench clean

# The virtualenv with l7lb installed as users install it (a real install, not
# an editable one, so that twistd finds the plugin), plus the test tools.
$(BIN)/twistd: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '.[test]'
	touch $@

install: $(BIN)/twistd
	$(BIN)/pip install --quiet --no-deps --force-reinstall .

demo: install
	@$(BIN)/python -m l7lb.demo --make-certificate demo/localhost.pem
	@echo "demo: backends on 127.0.0.1:$(DEMO_PORTS); balancer on http://127.0.0.1:8080 and https://localhost:8443"
	@echo "try: curl -i http://127.0.0.1:8080/apiA/hello"
	@echo "     curl -ik --http2 https://localhost:8443/apiB/hello"
	@$(BIN)/python -m l7lb.demo $(DEMO_PORTS) > /dev/null 2>&1 & \
	  backends=$$!; trap 'kill $$backends' EXIT INT TERM; \
	  $(BIN)/twistd --nodaemon --pidfile= l7lb --config $(CONFIG)

lint: install
	$(BIN)/ruff check l7lb tests bench twisted
	$(BIN)/ruff format --check l7lb tests bench twisted

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m twisted.trial --reactor=l7lb --jobs 2 tests

test: lint typecheck unit

bench: install
	$(PYTHON) bench/run.py --venv $(VENV)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* .mypy_cache .ruff_cache
