"""ACLSum's records as prompt/completion pairs, from files of the package's layout; and ROUGE-L scoring."""
from __future__ import annotations

import json

import pytest

from edge_client import aclsum, data
from edge_client.aclsum import AclSumError
from edge_client.objective import first_line, rouge_l


def paper(i: int) -> dict:
    summary = {"challenge": f"Problem {i} is hard.", "approach": f"They solve {i}.", "outcome": f"It works {i}."}
    sentences = {"abstract": [f"We study problem {i} .", "It matters ."], "introduction": ["x"]}
    return {"id": f"P{i}", "title": f"Paper {i}", "summary": repr(summary), "sentences": repr(sentences)}


def write_split(root, name, papers):
    (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in papers))


def test_papers_become_three_pairs_each(tmp_path):
    src = tmp_path / "dataset"
    src.mkdir()
    write_split(src, "train", [paper(i) for i in range(3)])
    write_split(src, "val", [paper(3)])
    write_split(src, "test", [paper(i) for i in range(4, 6)])
    train_p, test_p = aclsum.write_task(tmp_path / "cache", source=src)
    train, test = data.load(train_p), data.load(test_p)
    assert len(train.examples) == 12 and len(test.examples) == 6 and not train.is_classification
    ex = test.examples[1]
    assert ex.prompt == ("Title: Paper 4\nAbstract: We study problem 4 . It matters .\n\n"
                         "In one sentence, the approach of this paper:")
    assert ex.completion == " They solve 4."


def test_records_are_literals_never_code(tmp_path):
    src = tmp_path / "dataset"
    src.mkdir()
    bad = paper(0) | {"summary": "__import__('os').system('touch pwned')"}
    write_split(src, "train", [paper(1), bad])
    with pytest.raises(AclSumError, match=r"train.jsonl:2: 'summary' is not a literal dict"):
        aclsum.pairs(src / "train.jsonl")
    assert not (tmp_path / "pwned").exists()


def test_rouge_l():
    assert rouge_l([" The cat sat."], ["the cat sat\nand then more text"]) == pytest.approx(1.0)
    precision, recall = 2 / 3, 2 / 6      # the LCS "the sat", of 3 generated and 6 reference words
    assert rouge_l([" the cat sat on the mat"], ["the dog sat"]) == pytest.approx(
        2 * precision * recall / (precision + recall))
    assert rouge_l([" a b"], ["\n\nc d"]) == 0.0
    assert first_line("  one sentence.\nanother") == "one sentence."
