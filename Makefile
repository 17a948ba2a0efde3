# The two commands a newcomer needs: `make demo` (install everything, run the main job) and `make test`.
.PHONY: setup demo test protos validate-deploy

setup: .venv/.installed

.venv/.installed: pyproject.toml scripts/setup
	scripts/setup

demo: setup
	scripts/demo

test: setup
	.venv/bin/python -m pytest

# Regenerate vsearch/v1/ from protos/ with the pinned grpcio-tools.
protos: setup
	scripts/gen-protos

# Offline checks of the container, compose and Kubernetes files (installs its own tools).
validate-deploy:
	scripts/validate-deploy
