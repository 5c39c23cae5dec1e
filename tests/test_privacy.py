"""What a curious cloud learns from what really crosses the wire: messages recorded by a real server, attacked."""
from __future__ import annotations

import pytest
import torch

from cloud_server import launch, recorder
from common import tensor_codec as codec
from common.wire import dlora_pb2 as pb
from edge_client.data import Example
from edge_client.objective import encode

from helpers import EXAMPLES, connect


def nearest_tokens(hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The attack on embedding outputs: each position's nearest row of the public embedding table (L2)."""
    return torch.cdist(hidden.reshape(-1, hidden.shape[-1]), table).argmin(dim=1).reshape(hidden.shape[:-1])


@pytest.fixture(scope="module")
def recorded_step(model_dirs, tmp_path_factory):
    """One DLoRA training step of the test examples, recorded by the server that ran it."""
    root = tmp_path_factory.mktemp("record")
    with launch.start(["--model", str(model_dirs["llama"]), "--record-dir", str(root / "wire")],
                      root / "server.log", timeout=300) as server:
        edge = connect(server.address, root / "cache")
        try:
            batch = edge.batch()
            edge.step(1, batch)
        finally:
            edge.session.close()
    return root / "wire", batch, edge.tokenizer


def test_every_call_is_recorded(recorded_step):
    wire, _, _ = recorded_step
    for method in ("OpenSession", "GetEdgeAssets", "TrainStep", "CloseSession"):
        assert recorder.calls(wire, method), method
    kinds = [pb.EdgeMessage.FromString(m).WhichOneof("kind")
             for m in recorder.read(recorder.calls(wire, "TrainStep")[0])]
    assert kinds[0] == "start" and {"site_outputs", "final_grad", "site_grad_input"} <= set(kinds)


def test_nearest_neighbour_recovers_the_input_but_no_label(recorded_step, model_dirs):
    """At edge_layers 0 the first activations are embedding rows: the attack reads the text
    back (so this harness can fail), but the label, never sent, is not among them."""
    from transformers import AutoModelForCausalLM

    wire, batch, tokenizer = recorded_step
    table = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).get_input_embeddings().weight.detach()
    first = pb.EdgeMessage.FromString(next(recorder.read(recorder.calls(wire, "TrainStep")[0]))).start
    hidden = codec.decode(first.hidden, name="hidden")
    mask = codec.decode(first.attention_mask, name="mask")
    got = nearest_tokens(hidden, table)
    assert torch.equal(mask, batch.attention_mask)
    assert float((got == batch.input_ids)[mask].float().mean()) == 1.0  # every token of the input comes back
    for row, ex in enumerate(EXAMPLES):
        prompt, completion = encode(tokenizer, ex.prompt, ex.completion, 64)
        assert got[row][mask[row]].tolist() == prompt + completion[:-1], f"row {row}: more than the prompt was sent"


def test_recording_stops_at_its_limit(tmp_path, caplog):
    rec = recorder.MessageRecorder(tmp_path / "wire", limit_bytes=100)
    msg = pb.CloseSessionRequest(session_id="x" * 40)  # 42 bytes, 46 with its length
    call = rec.call("CloseSession")
    for _ in range(3):
        call.add(msg)
    kept = list(recorder.read(recorder.calls(tmp_path / "wire", "CloseSession")[0]))
    assert kept == [msg.SerializeToString()] * 2  # the third would pass 100 bytes
    assert "message recording stopped" in caplog.text


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 3.0])
def test_randomised_response_matches_its_epsilon(epsilon):
    """The keep rate is e^eps/(e^eps+C-1) within 4 sigma, flips spread evenly over the other
    labels, so P[release y | y] / P[release y | y'] = e^eps: epsilon-label-DP."""
    import math
    from collections import Counter

    from edge_client.label_privacy import keep_probability, randomise

    labels, n = ["a", "b", "c", "d", "e"], 25_000
    true = [labels[i % len(labels)] for i in range(n)]
    out = randomise(true, labels, epsilon, seed=1)
    p = keep_probability(epsilon, len(labels))
    assert p / ((1 - p) / (len(labels) - 1)) == pytest.approx(math.exp(epsilon))
    kept = sum(a == b for a, b in zip(true, out)) / n
    assert abs(kept - p) < 4 * math.sqrt(p * (1 - p) / n), (kept, p)
    for y in labels:
        flips = Counter(o for t, o in zip(true, out) if t == y and o != y)
        expected = n / len(labels) * (1 - p) / (len(labels) - 1)
        assert set(flips) == set(labels) - {y}
        for other, count in flips.items():
            assert abs(count - expected) < 5 * math.sqrt(expected), (y, other, count, expected)
    assert randomise(true, labels, epsilon, seed=1) == out  # drawn once, reproducibly


def test_label_privacy_rewrites_completions_and_refuses_unlabelled_data():
    from edge_client.data import Dataset, Example
    from edge_client.label_privacy import privatise

    train = Dataset([Example(f"text {i}", " red", "red") for i in range(200)], ["blue", "red"])
    noisy = privatise(train, 0.0, seed=0)  # epsilon 0: a fair coin between the two labels
    assert [ex.prompt for ex in noisy.examples] == [ex.prompt for ex in train.examples]
    assert all(ex.completion == " " + ex.label for ex in noisy.examples)
    assert 60 < sum(ex.label == "blue" for ex in noisy.examples) < 140
    with pytest.raises(ValueError, match="needs text/label data"):
        privatise(Dataset([Example("p", " c")], []), 1.0, seed=0)


def test_token_privacy_sends_only_released_tokens(model_dirs, tmp_path):
    """With --token-epsilon the cloud's recording holds the embedding of the released tokens,
    drawn with the step's own noise (so a resumed run replays it), not the text."""
    from transformers import AutoModelForCausalLM

    from edge_client import token_privacy
    from edge_client.objective import make_batch
    from edge_client.trainer import EdgeTrainer, TrainConfig, open_session

    table = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).get_input_embeddings().weight.detach()
    with launch.start(["--model", str(model_dirs["llama"]), "--record-dir", str(tmp_path / "wire")],
                      tmp_path / "server.log", timeout=300) as server:
        cfg = TrainConfig.of(server=server.address, cache=tmp_path / "cache", progress=False, token_epsilon=10.0,
                             seed=5)
        with open_session(cfg) as session:
            trainer = EdgeTrainer(cfg, session)
            trainer.label_ids = None
            batch = make_batch(trainer.tokenizer, EXAMPLES, 64)
            trainer.train_step(batch)
    first = pb.EdgeMessage.FromString(next(recorder.read(recorder.calls(tmp_path / "wire", "TrainStep")[0]))).start
    got = nearest_tokens(codec.decode(first.hidden, name="hidden"), table)
    mask = batch.attention_mask
    released = token_privacy.perturb(batch.input_ids, mask, table, 10.0, token_privacy.generator_for(5, 1))
    assert torch.equal(got[mask], released[mask])
    assert float((got == batch.input_ids)[mask].float().mean()) < 0.5  # most of the text never left


@pytest.mark.parametrize("factorised", [False, True], ids=["full-width", "factorised"])
def test_the_cloud_reconstructs_the_adapters_from_one_step(factorised, model_dirs, tmp_path):
    """Each site input (which the cloud computed) and the edge's answer to it give the cloud
    scale * B @ A of every live module by least squares: the adapters are not private. A
    factorised answer (scale * A x, and B) reveals the same product, and B itself."""
    with launch.start(["--model", str(model_dirs["llama"]), "--record-dir", str(tmp_path / "wire")],
                      tmp_path / "server.log", timeout=300) as server:
        edge = connect(server.address, tmp_path / "cache", factorised=factorised)
        # Text with more distinct bytes than the tiny model's 32 dimensions, so the first
        # block's site inputs span its whole input space (real training reaches that in a step).
        text = "The QUICK brown fox, 12 jumps; 34 over: 56 LAZY dogs! 7/8 (9) ?#@ WXYZ vq"
        try:
            edge.step(1, edge.batch([Example(text[i:] + text[:i], " sport") for i in range(0, 40, 10)]))
            sites = edge.session.sites
        finally:
            edge.session.close()
    call = recorder.calls(tmp_path / "wire", "TrainStep")[0]
    sent = [pb.EdgeMessage.FromString(m) for m in recorder.read(call)]
    got = [pb.CloudMessage.FromString(m) for m in recorder.read(recorder.replies(call))]
    inputs = {m.site_input.site: m.site_input for m in got if m.WhichOneof("kind") == "site_input"}
    outputs = {m.site_outputs.site: m.site_outputs for m in sent if m.WhichOneof("kind") == "site_outputs"}
    assert inputs.keys() == outputs.keys() == {s.index for s in sites}
    mask = codec.decode(sent[0].start.attention_mask, name="mask")
    for site in sites:
        x = codec.decode(inputs[site.index].x, name="x")[mask]
        live, answer = inputs[site.index].live, outputs[site.index]
        assert len(answer.factors if factorised else answer.outputs) == len(live) > 0
        for k, slot in enumerate(live):
            module = site.modules[slot]
            if factorised:
                up = codec.decode(answer.factors[k].up, name="up")
                assert torch.equal(up, edge.adapters[module.name].lora_B.detach())
                y = (codec.decode(answer.factors[k].down, name="down") @ up.T)[mask]
            else:
                y = codec.decode(answer.outputs[k], name="y")[mask]
            delta = torch.linalg.lstsq(x.double(), y.double()).solution.T.float()  # [out, in]
            ad = edge.adapters[module.name]
            true = ad.scale * ad.lora_B.detach() @ ad.lora_A.detach()
            assert float((delta - true).norm() / true.norm()) < 1e-3, module.name


def test_the_start_of_run_notice_quotes_the_measured_figures():
    """What `edge_client train` prints first: the bench's figure for these settings, or that it is unmeasured."""
    from edge_client import leakage

    default = leakage.notice("dlora", 0, 4, None, None, 5)
    assert f"{leakage.TOKENS[(0, None)]:.0%} of your training tokens from the embedding" in default
    assert "100% of your labels from the gradient" in default and "--label-epsilon" in default
    assert f"--token-epsilon {leakage.SUGGESTED_TOKEN_EPSILON:g} cuts the tokens" in default
    split = leakage.notice("splitlora", 0, 2, 2.0, None, 5)
    assert "the output of block 1" in split and "at most 65% of your labels" in split
    assert "an unmeasured share" in leakage.notice("dlora", 3, 4, None, None, 5)  # 3 edge layers: not benched
    secret = leakage.notice("dlora", 0, 4, None, None, 5, secret_labels=True)
    assert f"{leakage.SECRET_LABELS_NAMED_BY_TEXT:.0%} of your labels (--secret-labels" in secret
    assert "--label-epsilon bounds the labels" in secret   # the only bound on labels
    front = leakage.notice("dlora", 2, 4, None, None, 5, front_privacy=0.1)
    assert f"{leakage.FRONT_TOKENS[(2, 0.1)]:.0%} of your training tokens from the output of block 1" in front
    assert "not a cloud that fits a front of its shape" in front
    assert "an unmeasured share" in leakage.notice("dlora", 2, 4, None, None, 5, front_privacy=0.3)
    hardened = leakage.notice("dlora", 0, 4, 1.0, leakage.SUGGESTED_TOKEN_EPSILON, 5)
    assert "bounds the labels" not in hardened and "cuts the tokens" not in hardened


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_label_tokens_released_as_epsilon_says(epsilon):
    """The Python API's label DP: each class token is kept at e^eps/(e^eps+C-1), else uniformly another,
    the input carries the released token too, and one example always gets the same release."""
    from edge_client.label_privacy import keep_probability, release_tokens

    classes, rows, length = [11, 12, 13, 14], 6000, 6
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 90, (rows, length), generator=gen)
    truth = torch.tensor(classes)[torch.randint(0, 4, (rows,), generator=gen)]
    ids[:, -1] = truth                              # Hugging Face's layout: labels[t] is input_ids[t]
    labels = torch.full_like(ids, -100)
    labels[:, -1] = truth
    mask = torch.ones_like(ids, dtype=torch.bool)
    new_ids, new_labels = release_tokens(ids, mask, labels, classes, epsilon, seed=7)
    assert torch.equal(new_ids[:, -1], new_labels[:, -1]) and torch.equal(new_ids[:, :-1], ids[:, :-1])
    kept = float((new_labels[:, -1] == truth).float().mean())
    want = keep_probability(epsilon, len(classes))
    assert abs(kept - want) < 4 * (want * (1 - want) / rows) ** 0.5, (kept, want)
    flipped = new_labels[:, -1][new_labels[:, -1] != truth]
    shares = torch.stack([(flipped == c).float().mean() for c in classes])
    assert float(shares.max() - shares.min()) < 0.05            # the other labels, uniformly
    # One example, padded differently in another batch, gets the same release.
    padded = torch.cat([ids[:3], torch.zeros(3, 2, dtype=ids.dtype)], dim=1)
    pad_labels = torch.cat([labels[:3], torch.full((3, 2), -100, dtype=labels.dtype)], dim=1)
    pad_mask = torch.cat([mask[:3], torch.zeros(3, 2, dtype=torch.bool)], dim=1)
    _, again = release_tokens(padded, pad_mask, pad_labels, classes, epsilon, seed=7)
    assert torch.equal(again[:, length - 1], new_labels[:3, -1])


def test_the_model_trains_on_released_labels(servers, cache):
    """With label_epsilon, forward(labels=...) computes its loss on the released tokens, in the input too."""
    from peft import LoraConfig

    from edge_client.label_privacy import release_tokens
    from edge_client.remote_model import DLoRAModelForCausalLM

    classes = [5, 6, 7]
    ids = torch.tensor([[20, 21, 22, 5], [30, 31, 32, 6], [40, 41, 42, 7], [50, 51, 52, 5]])
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with pytest.raises(ValueError, match="label_token_ids"):
        DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache, label_epsilon=1.0)
    with DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache,
                                       label_epsilon=0.1, label_token_ids=classes) as private, \
            DLoRAModelForCausalLM.connect(servers["llama"], LoraConfig(r=4, lora_alpha=8), cache=cache) as plain:
        rel_ids, rel_labels = release_tokens(ids, torch.ones_like(ids, dtype=torch.bool), labels, classes, 0.1, 0)
        assert not torch.equal(rel_labels, labels)    # at epsilon 0.1 some of the 4 labels move (seeded)
        with torch.no_grad():
            got = private(ids, labels=labels).loss
            want = plain(rel_ids, labels=rel_labels).loss
            true = plain(ids, labels=labels).loss
        assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want)) and float(got) != float(true)


def test_label_clusters_are_scored_by_their_best_mapping_and_named_by_votes():
    """The clustering attacks on synthetic classes: three tight groups under shuffled cluster ids score 100%,
    votes name each group by its majority, and noise without structure scores near chance."""
    from bench import label_attacks as la

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=gen) * 5
    truth = torch.arange(60) % 3
    points = centres[truth] + 0.1 * torch.randn(60, 16, generator=gen)
    assign = la.kmeans(points, 3, seed=1)
    assert la.best_mapping_accuracy(assign, truth, 3) == 1.0
    assert la.best_mapping_accuracy((assign + 1) % 3, truth, 3) == 1.0           # names do not matter
    votes = truth.clone()
    votes[:12] = (votes[:12] + 1) % 3                                            # a fifth of the votes wrong
    assert torch.equal(la.named_by_majority(assign, votes, 3), truth)
    noise = la.kmeans(torch.randn(300, 16, generator=gen), 3, seed=1)
    assert la.best_mapping_accuracy(noise, torch.randint(0, 3, (300,), generator=gen), 3) < 0.45
    assert la.best_mapping_accuracy(torch.tensor([0, 0, 1]), torch.tensor([1, 1, 0]), 12) == 1.0  # greedy path


def test_secret_labels_keep_the_gradient_off_the_label_rows(jsonl, tmp_path):
    """With --secret-labels the recorded final-hidden gradient is a mix of the secret tokens' head rows
    (and the final hidden state, through the norm), not of the labels' own rows; the tokens stay on the device."""
    import json
    import stat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.tiny_models import save_tiny

    from helpers import cli

    out = tmp_path / "run"
    model_dir = save_tiny("llama", tmp_path / "model", words=("sport", "tech"))   # one-token labels
    with launch.start(["--model", str(model_dir), "--record-dir", str(tmp_path / "wire")],
                      tmp_path / "server.log", timeout=300) as server:
        res = cli("edge_client", "train", "--server", server.address, "--data", str(jsonl), "--steps", "1",
                  "--batch-size", "4", "--eval-limit", "4", "--rank", "2", "--out", str(out), "--no-progress",
                  "--secret-labels")
        assert res.returncode == 0, res.stderr
        refused = cli("edge_client", "train", "--server", server.address, "--data", str(jsonl), "--steps", "1",
                      "--objective", "lm", "--secret-labels", "--out", str(tmp_path / "lm"), "--no-progress")
        assert refused.returncode != 0 and "--secret-labels needs the label objective" in refused.stderr
    secret = json.loads((out / "secret_labels.json").read_text())
    assert stat.S_IMODE((out / "secret_labels.json").stat().st_mode) == 0o600
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    label_ids = [tok(" " + lab, add_special_tokens=False).input_ids[0] for lab in secret["labels"]]
    assert sorted(secret["labels"]) == ["sport", "tech"] and not set(secret["token_ids"]) & set(label_ids)
    head, w = model.get_output_embeddings().weight.detach(), model.model.norm.weight.detach()
    call = recorder.calls(tmp_path / "wire", "TrainStep")[0]
    sent = [pb.EdgeMessage.FromString(m) for m in recorder.read(call)]
    replies = [pb.CloudMessage.FromString(m) for m in recorder.read(recorder.replies(call))]
    g = codec.decode(next(m.final_grad.grad for m in sent if m.WhichOneof("kind") == "final_grad"), name="g").double()
    h = codec.decode(next(m.final_hidden.hidden for m in replies if m.WhichOneof("kind") == "final_hidden"),
                     name="h").double()
    marked = g.norm(dim=-1) > 0
    assert int(marked.sum()) == 4

    def residual(rows: list[int]) -> float:
        # d loss / d h = (w * v) / rms(h) - c h for v in the span of the trained head rows (RMSNorm's Jacobian).
        worst = 0.0
        for gi, hi in zip(g[marked], h[marked]):
            basis = torch.cat([(w.double() * head[rows].double()).T, hi[:, None]], dim=1)
            fit = basis @ torch.linalg.lstsq(basis, gi[:, None]).solution
            worst = max(worst, float((fit[:, 0] - gi).norm() / gi.norm()))
        return worst

    assert residual(secret["token_ids"]) < 1e-4
    assert residual(label_ids) > 0.1
