# The README's commands. `make setup` is idempotent: a second run only checks.
PY := .venv/bin/python

.PHONY: setup test lint demo clean-venv

setup:
	@bash tools/setup_env.sh

# One pytest worker per core (most tests start processes or run one-thread work); the
# workers steal queued tests from each other so that the long ones do not end up in one queue.
test: setup
	$(PY) -m pytest -n auto --dist worksteal

lint: setup
	.venv/bin/ruff check .

demo: setup
	bash tools/demo.sh

clean-venv:
	rm -rf .venv
