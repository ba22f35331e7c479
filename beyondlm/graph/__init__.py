"""Concept graphs for graph look-up (GRF, METHODS.md): one graph type (``core``), mined from
documents (``mine``), loaded from ConceptNet triples (``conceptnet``), and checked exactly
against the synthetic language (``language_check``). Imports neither torch nor faiss."""

from beyondlm.graph.conceptnet import load_conceptnet, read_triples
from beyondlm.graph.core import (
    SYMMETRIC, ConceptGraph, build_graph, from_arrays, load_graph, neighbours, prune, save_graph, statistics,
)
from beyondlm.graph.language_check import language_check, producible, producible_by_component, relation_gaps
from beyondlm.graph.mine import CONTENT_SLOTS, GraphConfig, frequency_content, language_content, mine_graph

__all__ = [
    "SYMMETRIC", "ConceptGraph", "build_graph", "from_arrays", "load_graph", "neighbours", "prune", "save_graph",
    "statistics", "load_conceptnet", "read_triples", "language_check", "producible", "producible_by_component",
    "relation_gaps",
    "CONTENT_SLOTS", "GraphConfig", "frequency_content", "language_content", "mine_graph",
]
