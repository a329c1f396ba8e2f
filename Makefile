# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= .venv/bin/python
VENV_STAMP := .venv/.installed
# one process on a laptop; `make demo LAUNCH=".venv/bin/torchrun --standalone --nproc_per_node=2"` runs DDP
LAUNCH ?= $(PY)
DEMO_DATA ?= data/demo
DEMO_RUNS ?= runs/demo

.PHONY: demo test paper-table clean-demo

$(VENV_STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(VENV_STAMP)

test: $(VENV_STAMP)
	$(PY) -m pytest -q tests

$(DEMO_DATA)/.complete: $(VENV_STAMP)
	$(PY) cli.py demo-data --out $(DEMO_DATA)

demo: $(VENV_STAMP) $(DEMO_DATA)/.complete
	$(LAUNCH) cli.py expand --config configs/demo.toml --out $(DEMO_RUNS)/expand
	$(LAUNCH) cli.py squeeze --config configs/demo.toml --teacher $(DEMO_RUNS)/expand/checkpoint.pt --out $(DEMO_RUNS)/squeeze
	$(PY) cli.py export --checkpoint $(DEMO_RUNS)/expand/checkpoint.pt --branch det --out $(DEMO_RUNS)/expand/backbone-det.pth
	$(PY) cli.py transfer --config configs/demo.toml --backbone random --name random --backbone $(DEMO_RUNS)/squeeze/backbone.pth --name x-learner --out $(DEMO_RUNS)/transfer
	@echo
	@echo "transfer table: $(DEMO_RUNS)/transfer/results.md (every number: results.json)"
	@echo "checkpoints:    $(DEMO_RUNS)/expand/checkpoint.pt, $(DEMO_RUNS)/squeeze/checkpoint.pt (re-run to resume)"
	@echo "metrics:        $(DEMO_RUNS)/expand/metrics.json, $(DEMO_RUNS)/squeeze/metrics.json (student vs teacher)"
	@echo "backbone:       $(DEMO_RUNS)/squeeze/backbone.pth (loads into torchvision.models.resnet18(), only fc.* missing)"

paper-table: $(VENV_STAMP) $(DEMO_DATA)/.complete
	$(PY) cli.py ablate --config configs/ablate.toml --out docs/ablation

clean-demo:
	rm -rf $(DEMO_RUNS)
