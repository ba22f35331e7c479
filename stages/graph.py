"""Stage ``graph``: a concept graph mined from the prepared split, or loaded from ConceptNet triples.

params: prepare.out_dir, graph.* (beyondlm/graph/mine.py: GraphConfig)
deps:   ${prepare.out_dir}, inputs/graph/ (files named by graph.conceptnet); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (nodes.parquet, edges.parquet: beyondlm/graph/core.py)
metrics: --metrics (sizes, degrees, connectivity; on the synthetic language the fraction of
         edges it can produce, exactly, against random pairs)
"""

import argparse
import time
from pathlib import Path

import numpy as np

from beyondlm import cli
from beyondlm.config import ConfigError, load_section, read_params, section
from beyondlm.data.config import PreparedData, prepared_data
from beyondlm.data.prepare import load_split, load_tokenizer
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.graph import (GraphConfig, frequency_content, language_check, language_content, load_conceptnet,
                            mine_graph, prune, relation_gaps, save_graph, statistics)
from beyondlm.io import write_metrics


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> GraphConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(GraphConfig, section(params, "graph"), "graph")
    if cfg.source == "conceptnet":
        check_declared_inputs("graph", {f"graph.conceptnet[{i}]": p for i, p in enumerate(cfg.conceptnet)})
    return cfg


def mine(cfg: GraphConfig, data: PreparedData):
    """(unpruned graph, the synthetic language or None, texts read) from the prepared split."""
    seqs = [s[1:] for s in load_split(data.data_dir, cfg.split)["input_ids"]]  # drop BOS
    seqs = seqs[: cfg.max_texts] if cfg.max_texts else seqs
    language = data.language()
    if cfg.content == "language" and language is None:
        raise ConfigError("params.yaml: 'graph.content'='language' needs the synthetic language "
                          f"({data.data_dir}/language.json, prepare.source=synthetic); use frequency")
    if language is not None and cfg.content != "frequency":
        names, content = language.vocab, language_content(language)  # word tokenizer ids = language ids
    else:
        tok = load_tokenizer(data.data_dir)
        names = [tok.decode([i]).strip() for i in range(len(tok))]
        content = frequency_content(seqs, names, tok.all_special_ids, stop_top=cfg.stop_top, min_chars=cfg.min_chars)
    graph = mine_graph(seqs, np.asarray(content), names, window=cfg.window, cooccur_window=cfg.cooccur_window,
                       min_node_count=cfg.min_node_count)
    return graph, language, len(seqs)


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    start = time.perf_counter()
    language, n_texts = None, None
    if cfg.source == "conceptnet":
        graph = load_conceptnet(cfg.conceptnet, keep_corrupted=cfg.keep_corrupted)
    else:
        graph, language, n_texts = mine(cfg, prepared_data(params))
    graph = prune(graph, min_node_count=cfg.min_node_count, min_edge_count=cfg.min_edge_count,
                  max_degree=cfg.max_degree, rank_by=cfg.rank_by)
    save_graph(graph, args.out)
    metrics = {"source": cfg.source, "n_texts": n_texts, **statistics(graph)}
    if language is not None:
        metrics["language_check"] = language_check(graph, language, relation_gaps(cfg.window, cfg.cooccur_window))
    write_metrics(args.metrics, {**metrics, "seconds": time.perf_counter() - start})


if __name__ == "__main__":
    cli.run(main)
