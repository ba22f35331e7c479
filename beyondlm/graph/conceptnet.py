"""ConceptNet triples (Li et al., ACL 2016, commonsense knowledge base completion: the CKBC files
``relation<TAB>head<TAB>tail<TAB>label``, label 1 = a true triple, 0 = a corrupted one made for
the classification task) as a :class:`ConceptGraph`.

Nodes are the head/tail phrases (count = times named as head or tail in kept rows, token = −1: a phrase is not
one token of our tokenizers); an edge head→tail per relation, count = rows holding that triple
across the files. Corrupted rows are dropped, or with ``keep_corrupted`` kept under the relation
``<relation>:corrupted`` so nothing mistakes them for facts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from beyondlm.graph.core import ConceptGraph, build_graph
from beyondlm.inputs import InputError, reading, require

CORRUPTED = ":corrupted"
_FIX = "give graph.conceptnet files of relation<TAB>head<TAB>tail<TAB>label lines (label 0 or 1)"


def read_triples(path: str | Path) -> list[tuple[str, str, str, int]]:
    """(relation, head, tail, label) rows; a malformed line raises InputError naming it."""
    path = require(path, "ConceptNet triples file", _FIX)
    rows = []
    with reading(path, "ConceptNet triples file", _FIX):
        lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4 or fields[3].strip() not in ("0", "1") or not all(f.strip() for f in fields[:3]):
            raise InputError(path, f"line {n} is not relation<TAB>head<TAB>tail<TAB>label(0|1): {line[:80]!r}", _FIX)
        rel, head, tail = (f.strip() for f in fields[:3])
        rows.append((rel, head, tail, int(fields[3])))
    return rows


def load_conceptnet(paths: Sequence[str | Path], *, keep_corrupted: bool = False) -> ConceptGraph:
    """One graph from all ``paths`` (see the module docstring)."""
    index: dict[str, int] = {}
    counts: list[int] = []
    edges: dict[tuple[int, int, str], int] = {}
    for path in paths:
        for rel, head, tail, label in read_triples(path):
            if not label:
                if not keep_corrupted:
                    continue
                rel += CORRUPTED
            ids = []
            for name in (head, tail):
                if name not in index:
                    index[name] = len(index)
                    counts.append(0)
                counts[index[name]] += 1
                ids.append(index[name])
            key = (ids[0], ids[1], rel)
            edges[key] = edges.get(key, 0) + 1
    return build_graph(list(index), counts, [-1] * len(index), edges)
