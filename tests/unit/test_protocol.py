"""The protocol has no field that could carry text, token ids or labels."""
from __future__ import annotations

import re

from common.wire import dlora_pb2 as pb

FORBIDDEN = re.compile(r"token|text|label|input_ids|prompt|completion|vocab_ids", re.I)


def _fields(desc, seen):
    if desc.full_name in seen:
        return
    seen.add(desc.full_name)
    for f in desc.fields:
        yield desc.full_name, f
        if f.message_type is not None:
            yield from _fields(f.message_type, seen)


def test_no_private_fields_anywhere():
    seen: set[str] = set()
    names = []
    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        for owner, field in _fields(msg, seen):
            names.append(f"{owner}.{field.name}")
            # max_batch_tokens is a count, not tokens.
            if field.name == "max_batch_tokens":
                continue
            assert not FORBIDDEN.search(field.name), f"{owner}.{field.name} looks like private data"
    assert len(names) > 30  # the walk really covered the protocol


def test_package_is_versioned():
    assert pb.DESCRIPTOR.package == "dlora.v1"
    service = pb.DESCRIPTOR.services_by_name["DLoRA"]
    assert {m.name for m in service.methods} >= {"OpenSession", "CloseSession", "GetEdgeAssets", "TrainStep", "Forward"}
