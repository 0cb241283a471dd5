# The README's commands. `make setup` is idempotent: a second run only checks.
PY := .venv/bin/python

.PHONY: setup test lint demo clean-venv

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest

lint: setup
	.venv/bin/ruff check .

demo: setup
	bash tools/demo.sh

clean-venv:
	rm -rf .venv
