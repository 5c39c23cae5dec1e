"""Multiple-choice scoring: each choice's summed log-likelihood, against a tiny model scored sequence by sequence."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.tiny_models import save_tiny
from edge_client.data import Example
from edge_client.objective import multiple_choice


def test_choices_scored_as_whole_sequences(tmp_path):
    path = save_tiny("llama", tmp_path / "m", seed=3)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    def hidden(ids, mask):   # the final norm's output; the head is then the whole of logits_fn
        return model.model(input_ids=ids, attention_mask=mask).last_hidden_state

    examples = [Example(f"Question {i}: which?", "", choices=(" red", " green light", " b", " blue sky")[: 2 + i % 3])
                for i in range(7)]

    def reference(ex: Example) -> int:
        scores = []
        for c in ex.choices:
            p, q = tok(ex.prompt).input_ids, tok(c, add_special_tokens=False).input_ids
            logp = torch.log_softmax(model(torch.tensor([p + q])).logits[0], dim=-1)
            scores.append(sum(float(logp[len(p) - 1 + j, t]) for j, t in enumerate(q)))
        return max(range(len(scores)), key=scores.__getitem__)

    seen = []
    with torch.no_grad():
        got = multiple_choice(tok, examples, hidden, model.lm_head, max_length=64, batch_size=4,
                              progress=seen.append)
        want = [reference(ex) for ex in examples]
    assert got == want
    assert sum(seen) == len(examples)          # progress counts examples, each once
    assert len(set(want)) > 1                  # the check can tell choices apart
