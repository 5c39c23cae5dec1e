"""`cloud_server --metrics-port`: Prometheus metrics, scraped from a real server during a real run."""
from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cloud_server import launch
from edge_client.errors import CloudError
from edge_client.generation import GenerateConfig, generate

from helpers import connect, split_trainer


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by (name, sorted labels)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metrics_url(log: Path) -> str:
    """The address the server logged for its metrics (it picked a free port)."""
    for _ in range(100):
        if m := re.search(r"metrics: (http://\S+/metrics)", log.read_text()):
            return m.group(1)
        time.sleep(0.1)
    raise AssertionError(f"no metrics address in {log}")


def test_counters_move_as_the_run_says(model_dirs, tmp_path, cache):
    log = tmp_path / "server.log"
    with launch.start(["--model", str(model_dirs["llama"]), "--device", "cpu", "--metrics-port", "0"], log) as server:
        url = metrics_url(log)
        before = scrape(url)
        assert before[("dlora_sessions_open", (("mode", "dlora"),))] == 0
        edge = connect(server.address, cache)
        try:
            batch = edge.batch()
            edge.step(1, batch)
            edge.step(2, batch)
            with torch.no_grad():   # a forward: no training step
                edge.model.final_hidden(batch.input_ids, batch.attention_mask)
            generate(edge.session, edge.edge, edge.tokenizer, edge.adapters, [5, 6, 7],
                     GenerateConfig(max_new_tokens=3, stop_at_eos=False))
            during = scrape(url)
            assert during[("dlora_sessions_open", (("mode", "dlora"),))] == 1
            with pytest.raises(CloudError) as refused:
                edge.session.park({"no.such.module": next(iter(edge.adapters.values()))}, [])
            code = refused.value.code
        finally:
            edge.session.close()
        # A SplitLoRA client of its own federation: two steps, FedAvg every step (one client per round).
        trainer, batches = split_trainer(server.address, cache, "metrics", steps=2, aggregate_every=1)
        try:
            splits_open = scrape(url)[("dlora_sessions_open", (("mode", "splitlora"),))]
            for b in batches:
                trainer.train_step(b)
        finally:
            trainer.session.close()
        after = scrape(url)

    def value(name: str, **labels: str) -> float:
        return after.get((name, tuple(sorted(labels.items()))), 0.0)

    tokens = int(batch.attention_mask.sum())
    assert value("dlora_steps_total", kind="train") == 2 + 2       # two DLoRA steps, two SplitLoRA steps
    assert value("dlora_steps_total", kind="forward") == 1
    assert value("dlora_steps_total", kind="generation") == 1
    assert value("dlora_tokens_total", kind="forward") == tokens
    assert value("dlora_tokens_total", kind="train") >= 2 * tokens
    assert value("dlora_step_seconds_count", kind="train") == 4
    assert value("dlora_cloud_compute_seconds_sum", kind="train") <= value("dlora_step_seconds_sum", kind="train")
    assert value("dlora_joint_batch_sessions_count") == 3           # the DLoRA steps and the forward: batchable
    assert value("dlora_federation_rounds_total") == 2
    assert splits_open == 1 and value("dlora_sessions_open", mode="splitlora") == 0
    assert value("dlora_sessions_open", mode="dlora") == 0
    assert value("dlora_errors_total", method="ParkAdapters", code=code.name) == 1
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)
    # Bytes each way: a step's activations dwarf everything else.
    assert value("dlora_received_bytes_total", method="TrainStep") > value("dlora_received_bytes_total",
                                                                           method="OpenSession") > 0
    assert value("dlora_sent_bytes_total", method="TrainStep") > 0
    assert not any(k[0] == "dlora_errors_total" and k[1] and dict(k[1])["code"] in ("INTERNAL", "UNKNOWN")
                   for k in after)


def test_a_bad_metrics_port_is_a_usage_error(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "cloud_server", "--metrics-port", "70000"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--metrics-port must be 0..65535" in res.stderr
