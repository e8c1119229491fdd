# The two commands in the README: `make run` and `make test`.
CORES ?= all
SNAKEMAKE := .venv/bin/snakemake

.PHONY: run test venv venv-dev lint clean

# Set up (once) and run the default experiment on the bundled sample data.
run: venv
	$(SNAKEMAKE) --cores $(CORES)

# Set up (once) and run the whole test suite, with the services it needs.
test: venv-dev
	tests/run.sh

venv:
	./bootstrap.sh

venv-dev:
	./bootstrap.sh dev

# Style and workflow checks (also run by the test suite).
lint: venv-dev
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/snakefmt --check Snakefile rules/ && $(SNAKEMAKE) --lint

clean:
	rm -rf results scratch resources .snakemake
