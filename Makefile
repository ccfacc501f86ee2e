# One command to set up and run the relay on the example rules, one to run the tests.
#   make run    create .venv, install routedsl, serve routes.rules on 127.0.0.1:2525
#   make test   create .venv, install routedsl with its test tools, run the suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,fast]'
	touch $@

.PHONY: setup run test check
setup: $(BIN)/.installed

# The example file's smarthosts read their passwords from the environment;
# demo values let it start on a machine that has no real accounts.
run: setup
	ISP_PASSWORD=$${ISP_PASSWORD:-demo} PROVIDER_PASSWORD=$${PROVIDER_PASSWORD:-demo} \
	  $(BIN)/routedsl serve routes.rules --listen 127.0.0.1:2525 --spool ./spool

check: setup
	$(BIN)/routedsl check routes.rules

test: setup
	$(BIN)/python -m pytest -q
