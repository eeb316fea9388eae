VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint unit bench crds image clean

setup:
	@./scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy operator/vmdisk
	PYTHONPATH=operator $(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest -q

demo: setup
	./scripts/demo.sh

bench: setup
	$(PY) -m bench

# vmdisk-operator:<version>, with docker where a daemon answers, else podman (cached).
image: setup
	./scripts/image.sh

crds: setup
	$(VENV)/bin/vmdisk crds --split crds
	cp crds/*.yaml charts/vmdisk-operator/crds/

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
