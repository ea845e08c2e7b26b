# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_SILENT := true

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/align prep demo --out data/demo
	$(BIN)/align train --config configs/demo.yaml
	@echo "zero-shot retrieval on held-out combinations: runs/demo/eval.json"
	$(BIN)/align embed --checkpoint runs/demo --manifest data/demo/train.csv data/demo/test.csv --out runs/demo/items
	$(BIN)/align audit --checkpoint runs/demo --manifest data/demo/train.csv data/demo/test.csv --items runs/demo/items \
		--out runs/demo/audit
	@echo "catalogue audit: runs/demo/audit/report.html (opens offline), audit.csv, agreement.png"
	$(BIN)/align map --embeddings runs/demo/items --manifest data/demo/train.csv data/demo/test.csv \
		--category-column kind --flags runs/demo/audit/audit.csv --out runs/demo
	@echo "embedding map: runs/demo/map.png and runs/demo/map.html (opens offline, no network)"
	$(BIN)/align prep shop-sim --catalogue data/demo/train.csv data/demo/test.csv --new data/demo/test.csv \
		--out data/demo/shop --seed 0
	$(BIN)/align rec-train --config configs/rec/demo.yaml
	$(BIN)/align rec-eval --checkpoint runs/demo/rec --output runs/demo/rec_eval.json
	@echo "recommender on the simulated shop: runs/demo/rec_eval.json, runs/demo/rec_mmr.png, runs/demo/rec_recall.png"
	$(BIN)/align index --embeddings runs/demo/items --out runs/demo/index \
		--metadata data/demo/train.csv data/demo/test.csv --fields title,kind,colour,pattern,size
	@echo "try it:  $(BIN)/align search --index runs/demo/index --text 'small green dotted star' -k 5"
	@echo "         $(BIN)/align recommend --checkpoint runs/demo/rec --user user0017 -k 5"
	@echo "         $(BIN)/align serve --index runs/demo/index --recommender runs/demo/rec   (README: Search your catalogue)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs data/demo
