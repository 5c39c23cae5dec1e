"""Non-IID shards of a labelled JSONL set, one per simulated device.

Each label's examples are spread over the clients by proportions drawn from a
Dirichlet(alpha) distribution: small alpha gives each client a few dominant
topics (the usual label-skew benchmark of federated learning), large alpha an
even mix. A client's test shard follows the mix of its training shard, the way
a device's own held-out data would.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from common.atomic_write import write_text
from edge_client.data import DataError, read_jsonl


def dirichlet(rng: random.Random, n: int, alpha: float) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    total = sum(draws) or 1.0
    return [d / total for d in draws]


def _assign(records: list[dict], shares: dict[str, list[float]], rng: random.Random, n: int) -> list[list[dict]]:
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    out: list[list[dict]] = [[] for _ in range(n)]
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        cuts = [0]
        acc = 0.0
        for p in shares[label][:-1]:
            acc += p
            cuts.append(round(acc * len(items)))
        cuts.append(len(items))
        for c in range(n):
            out[c] += items[cuts[c]:cuts[c + 1]]
    for part in out:
        rng.shuffle(part)
    return out


def make_shards(train: Path, test: Path, out: Path, clients: int, alpha: float = 0.5, seed: int = 0,
                min_train: int = 32, tries: int = 200) -> list[dict]:
    """Write out/client<i>/{train,test}.jsonl; returns per-client label counts."""
    if clients < 1:
        raise DataError("need at least one client")
    if alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha}")
    tr = [r for _, r in read_jsonl(train)]
    te = [r for _, r in read_jsonl(test)]
    if any(not isinstance(r.get("label"), str) for r in tr + te):
        raise DataError("sharding needs classification data: {\"text\", \"label\"} records")
    labels = sorted({r["label"] for r in tr + te})
    rng = random.Random(seed)
    for _ in range(tries):
        shares = {lab: dirichlet(rng, clients, alpha) for lab in labels}
        train_parts = _assign(tr, shares, rng, clients)
        test_parts = _assign(te, shares, rng, clients)
        if all(len(p) >= min_train for p in train_parts) and all(test_parts):
            break
    else:
        raise DataError(f"could not give each of {clients} clients {min_train} training examples; "
                        "use fewer clients or a larger alpha")
    summary = []
    for c, (tp, sp) in enumerate(zip(train_parts, test_parts)):
        d = out / f"client{c}"
        d.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.jsonl", tp), ("test.jsonl", sp)):
            write_text(d / name, "".join(json.dumps(r) + "\n" for r in part))
        summary.append({"client": c, "dir": str(d), "train": len(tp), "test": len(sp),
                        "labels": dict(sorted(Counter(r["label"] for r in tp).items()))})
    (out / "labels.txt").write_text(",".join(labels) + "\n")
    return summary
