# `make demo` and `make test` do all set-up themselves on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp

.PHONY: demo verifier-demo real test setup bench proto

demo: $(STAMP)
	$(PY) examples/toy/run.py

verifier-demo: $(STAMP)
	$(PY) examples/verifier_demo.py

real: $(STAMP)
	$(PY) examples/real/run.py

test: $(STAMP)
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh scripts/fetch_assets.sh
	bash scripts/setup.sh
	touch $(STAMP)

bench: $(STAMP)
	$(PY) bench/verifier.py
	$(PY) bench/teacher.py
	$(PY) bench/api.py
	$(PY) bench/e2e.py
	$(PY) bench/opd_vs_grpo.py
	$(PY) bench/memory.py
	$(PY) bench/real_model.py
	$(PY) bench/multiturn.py
	$(PY) bench/data.py
	$(PY) bench/soak.py
	$(PY) bench/scale.py
	$(PY) bench/chaos.py

proto: $(STAMP)
	$(PY) -m nebula.protogen
