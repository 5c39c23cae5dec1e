"""Settings declared once (common/settings.py): flags, Python's flat names and the composed TrainConfig agree."""
from __future__ import annotations

import argparse

import pytest

from common.settings import add_arguments, build
from edge_client.generation import CONNECTION, GenerateConfig
from edge_client.kill_revive import KRConfig
from edge_client.remote_model import RemoteConfig
from edge_client.trainer import TrainConfig, public_config


def parse(cls, argv: list[str]):
    p = argparse.ArgumentParser()
    add_arguments(p, cls)
    return build(cls, p.parse_args(argv))


def test_flat_names_fill_the_parts_as_the_flags_do():
    argv = ["--server", "gpu:1", "--r", "4", "--steps", "7", "--budget", "0.25", "--front-privacy", "0.1",
            "--edge-layers", "2", "--retries", "3"]
    from_flags = parse(TrainConfig, argv)
    from_python = TrainConfig.of(server="gpu:1", r=4, steps=7, budget=0.25, front_privacy=0.1, edge_layers=2,
                                 retries=3)
    assert from_flags == from_python
    assert (from_python.remote.server, from_python.lora.r, from_python.kr.budget, from_python.retry.retries,
            from_python.remote.private_front.front_privacy) == ("gpu:1", 4, 0.25, 3, 0.1)
    assert TrainConfig.of() == TrainConfig()   # unset: every default


def test_a_part_may_be_given_whole_and_unknown_names_are_refused():
    kr = KRConfig(policy="kr", period=3)
    assert TrainConfig.of(kr=kr, steps=2).kr is kr
    with pytest.raises(TypeError, match="no setting named bogus"):
        TrainConfig.of(bogus=1)
    with pytest.raises(ValueError, match="rank r must be >= 1"):   # the part's own check runs
        TrainConfig.of(r=0)


def test_network_presets_yield_to_explicit_settings():
    wan = TrainConfig.for_network("wan", steps=5)
    assert (wan.remote.wire_dtype, wan.kr.policy, wan.network) == ("int8", "kr", "wan")
    mine = TrainConfig.for_network("wan", wire_dtype="int4", kr=KRConfig(policy="random"))
    assert (mine.remote.wire_dtype, mine.kr.policy) == ("int4", "random")


def test_run_json_config_is_named_as_the_flags():
    doc = public_config(TrainConfig.of(server="gpu:1", r=4, token_epsilon=50.0))
    assert (doc["server"], doc["r"], doc["token_epsilon"]) == ("gpu:1", 4, 50.0)
    assert "remote" not in doc and "lora" not in doc and doc["kr"]["policy"] == "all"


def test_only_keeps_a_few_of_a_configs_flags():
    p = argparse.ArgumentParser()
    add_arguments(p, RemoteConfig, only=CONNECTION)
    add_arguments(p, GenerateConfig)
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == set(CONNECTION) | {"max_new_tokens", "temperature", "top_p", "seed"}
    with pytest.raises(ValueError, match="top_p"):
        build(GenerateConfig, p.parse_args(["--top-p", "0"]))
