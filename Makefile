# Entry points for developers and CI; .ci/run calls `make test`.

PYTHON ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
# Extra pytest arguments, e.g. `make test PYTEST_ARGS='-m "not kafka"'`.
PYTEST_ARGS ?=

.PHONY: venv test demo clean-servers

venv: $(VENV)/.installed

# The stamp file makes `make test` reinstall only after pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install -e '.[test,data]'
	touch $@

# pytest exits with 5 when it collects no tests; a run that tested nothing
# must not pass.
test: venv
	@$(VENV_PYTHON) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit code 5); check testpaths and PYTEST_ARGS" >&2; \
		exit 1; \
	fi; \
	exit $$status

# Streams the flights data through the worker into .work/demo/models.db
# while the predictor serves, then prints a report.
demo: venv
	$(VENV)/bin/streamfit demo --plot .work/demo/flights.png

# Removes the test servers' configs, logs and data. The cached Kafka jars and
# gocaves binary stay in ${XDG_CACHE_HOME:-~/.cache}/streamfit-test-servers.
clean-servers:
	rm -rf .work/servers
