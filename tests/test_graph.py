"""The concept graph (beyondlm/graph/): mining, pruning, Parquet, statistics, expansion, the exact
language check, the ConceptNet loader, and the ``graph`` stage in a temp project."""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from beyondlm.config import ConfigError, load_section
from beyondlm.data.synthetic import SLOTS, _class_lists
from beyondlm.graph import (CONTENT_SLOTS, GraphConfig, language_check, language_content, load_conceptnet, load_graph,
                            mine_graph, neighbours, producible, prune, relation_gaps, save_graph, statistics)
from beyondlm.graph.language_check import slot_pair_feasible
from beyondlm.inputs import InputError
from tests.helpers import TINY_SPEC, tiny_language

ROOT = Path(__file__).resolve().parents[1]
KG = ROOT.parent / "shared" / "data" / "kg"
MICRO = ROOT / "tests" / "data" / "micro_params.yaml"

# ids: 0 <eos>, 1 the, 2 cat, 3 dog, 4 ran, 5 big; "the" and <eos> are not content words
NAMES = ["<eos>", "the", "cat", "dog", "ran", "big"]
CONTENT = np.array([False, False, True, True, True, True])
TEXTS = [[1, 2, 4, 3],     # cat@1 ran@2 dog@3
         [2, 1, 1, 3, 2],  # cat@0 dog@3 cat@4
         [5, 2]]           # big@0 cat@1


def tiny_graph(window=2, cooccur_window=0):
    return mine_graph(TEXTS, CONTENT, NAMES, window=window, cooccur_window=cooccur_window)


def weights(g) -> dict[tuple[str, str, str], int]:
    return {(g.names[s], g.relations[r], g.names[d]): int(w) for s, d, r, w in zip(g.src, g.dst, g.rel, g.weight)}


def test_mining_a_hand_made_corpus_gives_the_counts_worked_out_by_hand():
    g = tiny_graph()
    # nodes by count descending, then name: cat 4, dog 2, big 1, ran 1; token = the word's id
    assert g.names == ("cat", "dog", "big", "ran")
    assert g.counts.tolist() == [4, 2, 1, 1] and g.tokens.tolist() == [2, 3, 5, 4]
    weight = weights(g)
    co = {("cat", "dog"): 2, ("cat", "ran"): 1, ("dog", "ran"): 1, ("big", "cat"): 1}  # texts holding both
    want = {(a, "co_occurs", b): c for (u, v), c in co.items() for a, b in ((u, v), (v, u))}
    # precedes within 2 tokens: t0 cat→ran, cat→dog, ran→dog; t1 dog→cat (cat@0→dog@3 is 3 apart); t2 big→cat
    want |= {("cat", "precedes", "ran"): 1, ("cat", "precedes", "dog"): 1, ("ran", "precedes", "dog"): 1,
             ("dog", "precedes", "cat"): 1, ("big", "precedes", "cat"): 1}
    assert weight == want
    assert g.relations == ("co_occurs", "precedes")
    assert list(g.src) == sorted(g.src)  # CSR order: each node's out-edges are one slice


def test_windows_change_exactly_the_pairs_they_should():
    anywhere = weights(tiny_graph(window=0))  # t1 now also has cat@0 → dog@3 (and dog@3 → cat@4 still)
    assert anywhere[("cat", "precedes", "dog")] == 2 and anywhere[("dog", "precedes", "cat")] == 1
    near = tiny_graph(cooccur_window=1)  # co_occurs only 1 token apart: t0 cat–ran, ran–dog; t1 dog–cat; t2 big–cat
    assert {(a, b) for a, _, b in near.edge_set("co_occurs") if a < b} == {("cat", "ran"), ("dog", "ran"),
                                                                            ("cat", "dog"), ("big", "cat")}
    few = mine_graph(TEXTS, CONTENT, NAMES, window=2, cooccur_window=0, min_node_count=2)
    assert few.names == ("cat", "dog")


def test_pruning_by_hand():
    g = tiny_graph()
    assert prune(g, min_edge_count=2).edge_set() == {("cat", "co_occurs", "dog"), ("dog", "co_occurs", "cat")}
    p = prune(g, min_node_count=2)
    assert p.names == ("cat", "dog") and p.edge_set() == {
        ("cat", "co_occurs", "dog"), ("dog", "co_occurs", "cat"), ("cat", "precedes", "dog"), ("dog", "precedes", "cat")}
    # max_degree 1: co_occurs keeps u–v only if mutual top-1 (cat's top is dog, dog's is cat; ran's and
    # big's top is cat, but cat's is dog); precedes keeps each node's strongest out-edge, ties to the lower id
    capped = prune(g, max_degree=1)
    assert capped.edge_set("co_occurs") == {("cat", "co_occurs", "dog"), ("dog", "co_occurs", "cat")}
    assert capped.edge_set("precedes") == {("cat", "precedes", "dog"), ("ran", "precedes", "dog"),
                                           ("dog", "precedes", "cat"), ("big", "precedes", "cat")}
    assert capped.names == g.names  # nodes stay even when their edges go
    # lift = c(u, v) / count(v), counts cat 4, dog 2, big 1, ran 1: cat's list ties dog, ran, big at 1.0 (dog has
    # the lower id); dog's top is ran (1/1 > 2/4), ran's dog (1/2 > 1/4): only dog–ran is mutual
    lift = prune(g, max_degree=1, rank_by="lift")
    assert lift.edge_set("co_occurs") == {("dog", "co_occurs", "ran"), ("ran", "co_occurs", "dog")}
    assert lift.edge_set("precedes") == {("cat", "precedes", "ran"), ("ran", "precedes", "dog"),
                                         ("dog", "precedes", "cat"), ("big", "precedes", "cat")}
    with pytest.raises(ValueError, match="rank_by"):
        prune(g, rank_by="pmi")


def test_parquet_round_trip(tmp_path):
    g = tiny_graph()
    save_graph(g, tmp_path / "graph")
    assert sorted(p.name for p in (tmp_path / "graph").iterdir()) == ["edges.parquet", "nodes.parquet"]
    back = load_graph(tmp_path / "graph")
    assert back.names == g.names and back.relations == g.relations
    for key in ("counts", "tokens", "src", "dst", "rel", "weight"):
        assert np.array_equal(getattr(back, key), getattr(g, key)), key
    (tmp_path / "graph/edges.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="edges.parquet: not a readable Parquet file"):
        load_graph(tmp_path / "graph")


def test_statistics_by_hand():
    s = statistics(tiny_graph())
    assert s["n_nodes"] == 4 and s["n_edges"] == 13
    assert s["n_edges_per_relation"] == {"co_occurs": 8, "precedes": 5}
    # distinct neighbours: cat 3 (dog, ran, big), dog 2, ran 2, big 1
    assert s["degree"]["mean"] == 2.0 and s["degree"]["max"] == 3
    assert s["degree_histogram"] == {"0": 0, "1-1": 1, "2-3": 3}
    assert s["out_degree"]["precedes"]["mean"] == 1.25 and s["out_degree"]["precedes"]["max"] == 2
    assert s["components"] == 1 and s["largest_component_fraction"] == 1.0 and s["isolated_nodes"] == 0
    split = statistics(prune(tiny_graph(), min_edge_count=2))  # cat–dog, with big and ran isolated
    assert split["components"] == 3 and split["largest_component_fraction"] == 0.5 and split["isolated_nodes"] == 2


def test_neighbours_expand_hop_by_hop_strongest_first():
    g = tiny_graph()
    cat, dog, big, ran = g.node_ids(["cat", "dog", "big", "ran"])
    # big → cat (co_occurs 1 + precedes 1); from cat: dog 2 + 1 = 3 beats ran 1 + 1 = 2
    assert [h.tolist() for h in neighbours(g, [big], hops=2, cap=1)] == [[big], [cat], [dog]]
    assert [h.tolist() for h in neighbours(g, [big], hops=2, cap=5)] == [[big], [cat], sorted([dog, ran])]
    # precedes only: from cat, dog and ran tie at 1: the lower id (dog) first
    assert [h.tolist() for h in neighbours(g, [big], hops=2, cap=1, relations=["precedes"])] == [[big], [cat], [dog]]
    with pytest.raises(ValueError, match="unknown relations"):
        neighbours(g, [cat], hops=1, cap=1, relations=["IsA"])


def test_slot_feasibility_on_a_hand_made_chain():
    # slots 0 → 1 → 2 → EOS(3), start at 0: the only text is s0 s1 s2 EOS (4 tokens)
    init, trans = np.array([1.0, 0, 0, 0]), np.zeros((4, 4))
    trans[0, 1] = trans[1, 2] = trans[2, 3] = trans[3, 3] = 1.0
    f = slot_pair_feasible(init, trans, max_len=4, gap=0, eos=3)
    assert {(a, b) for a, b in zip(*np.nonzero(f))} == {(0, 1), (0, 2), (1, 2)}
    assert not slot_pair_feasible(init, trans, max_len=4, gap=1, eos=3)[0, 2]  # 2 apart
    assert not slot_pair_feasible(init, trans, max_len=3, gap=0, eos=3).any()  # no text fits
    trans[2] = [0.5, 0, 0, 0.5]  # a loop 2 → 0: s1 then s0 needs s0 s1 s2 s0 s1 s2 EOS (s1 at 2, s0 at 4: 7 tokens)
    assert not slot_pair_feasible(init, trans, max_len=6, gap=0, eos=3)[1, 0]
    assert slot_pair_feasible(init, trans, max_len=7, gap=0, eos=3)[1, 0]


def _words(cls: str) -> list[str]:
    return list(_class_lists(TINY_SPEC)[cls])


def test_the_language_knows_which_words_can_meet():
    lang = tiny_language()
    p = producible(lang, 0)
    ix = {w: i for i, w in enumerate(lang.vocab)}
    either = p | p.T
    pos, neg = _words("adj+")[0], _words("adj-")[0]
    topic0, topic1 = (w for w in _words("topic0") if w not in _words("topic1")), _words("topic1")
    t0, t1 = next(topic0), next(w for w in topic1 if w not in _words("topic0"))
    assert not either[ix[pos], ix[neg]]  # mixed reviews are gold zeros
    assert not either[ix[t0], ix[t1]]  # one topic per review
    assert p[ix[pos], ix[t0]] and p[ix[t0], ix[pos]]  # "great <noun> ... great" in either order
    assert set(CONTENT_SLOTS) <= set(SLOTS)


def test_mined_edges_are_all_producible_and_random_pairs_are_not():
    lang = tiny_language()
    seqs = lang.sample(400, np.random.default_rng(0))
    g = mine_graph(seqs, language_content(lang), lang.vocab, window=3, cooccur_window=0)
    check = language_check(g, lang, relation_gaps(3, 0))
    for rel in ("co_occurs", "precedes"):
        # every mined pair has its own text as a witness: an exact check must accept all of them
        assert check[rel]["producible"] == 1.0 and check[rel]["producible_weighted"] == 1.0
        assert check[rel]["random_pairs_producible"] < 0.9
        assert 0 < check[rel]["recall"] <= 1
    assert check["precedes"]["random_pairs_producible"] < check["co_occurs"]["random_pairs_producible"]
    assert not set(g.names) & {"the", "a", ".", "<|endoftext|>"}  # function words are not nodes


def test_the_frequency_rule_drops_specials_short_tokens_and_the_most_frequent():
    from beyondlm.graph import frequency_content

    names = ["<eos>", "the", "a", "movie", "great", "is", "film!", "plot"]
    seqs = [[1, 3, 5, 4, 0], [1, 1, 7, 2, 6, 0]]  # "the" is the most frequent (3), then <eos> (2)
    got = frequency_content(seqs, names, special=[0], stop_top=1, min_chars=3)
    assert [n for n, ok in zip(names, got) if ok] == ["movie", "great", "plot"]  # film! is not alphabetic


def test_content_slots_match_the_gate():
    from beyondlm.lookup.gate import CONTENT_SLOTS as GATE_SLOTS

    assert CONTENT_SLOTS == GATE_SLOTS


@pytest.fixture
def kg() -> Path:
    if not KG.is_dir():
        pytest.skip(f"{KG} absent: the shared ConceptNet sample is not on this machine")
    return KG


def test_conceptnet_loader_on_the_shared_sample(kg):
    files = sorted(kg.glob("conceptnet_ckbc_*.txt"))
    g = load_conceptnet(files)
    # 4,800 rows, half label 1 (true); the 2,400 true triples are distinct; 26 relations among them
    assert g.n_edges == 2400 and int(g.weight.sum()) == 2400 and len(g.relations) == 26
    assert ("tool", "IsA", "object") in g.edge_set() and (g.tokens == -1).all()
    assert int(g.counts.sum()) == 2 * 2400  # each kept row names a head and a tail
    stats = statistics(g)
    assert stats["n_edges_per_relation"]["AtLocation"] == 480 and stats["n_edges_per_relation"]["IsA"] == 408
    both = load_conceptnet(files, keep_corrupted=True)
    assert int(both.weight.sum()) == 4800 and len(both.relations) > 26
    assert all(r.endswith(":corrupted") for r in set(both.relations) - set(g.relations))
    assert load_conceptnet([kg / "conceptnet_ckbc_dev1.txt"]).n_edges == 600


def test_a_malformed_triples_file_is_named_with_its_line(tmp_path):
    bad = tmp_path / "kg.txt"
    bad.write_text("IsA\tdog\tanimal\t1\nIsA\tcat\n")
    with pytest.raises(InputError, match=r"kg.txt: line 2 is not relation<TAB>head"):
        load_conceptnet([bad])


@pytest.mark.parametrize("raw, key", [({"window": -1}, "graph.window"), ({"source": "web"}, "graph.source"),
                                      ({"min_edge_count": 0}, "graph.min_edge_count"), ({"windw": 3}, "graph.windw"),
                                      ({"source": "conceptnet"}, "graph.conceptnet"), ({"content": "pos"}, "graph.content"),
                                      ({"rank_by": "pmi"}, "graph.rank_by")])
def test_bad_params_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_section(GraphConfig, raw, "graph")


# ----------------------------------------------------------------------------- the stage
def _run_stage(project: Path, monkeypatch, *args: str) -> None:
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setattr(sys, "argv", ["graph", *args])
    runpy.run_module("stages.graph", run_name="__main__")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The micro pipeline's prepared data (synthetic, 300 training texts)."""
    from beyondlm.data.config import PrepareConfig
    from beyondlm.data.prepare import prepare, write_prepared

    out = tmp_path_factory.mktemp("prepared") / "prepared"
    cfg = load_section(PrepareConfig, yaml.safe_load(MICRO.read_text())["prepare"], "prepare")
    write_prepared(prepare(cfg), out)
    return out


def test_stage_on_micro_params_writes_exactly_its_outputs(prepared, tmp_path, monkeypatch):
    params = yaml.safe_load(MICRO.read_text())
    params["prepare"]["out_dir"] = str(prepared)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _run_stage(tmp_path, monkeypatch, "--out", "data/graph", "--metrics", "m.json")
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["data/graph/edges.parquet", "data/graph/nodes.parquet", "m.json", "m.timing.json", "params.yaml"]
    m = json.loads((tmp_path / "m.json").read_text())
    g = load_graph(tmp_path / "data/graph")
    assert m["n_nodes"] == g.n_nodes > 0 and m["n_edges"] == g.n_edges > 0 and m["n_texts"] == 300
    assert m["out_degree"]["precedes"]["max"] <= params["graph"]["max_degree"]
    for rel in ("co_occurs", "precedes"):
        assert m["language_check"][rel]["producible"] == 1.0
        assert m["language_check"][rel]["random_pairs_producible"] < 1.0


def test_stage_loads_conceptnet_only_from_its_declared_inputs(kg, tmp_path, monkeypatch, capsys):
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load(MICRO.read_text())
    (tmp_path / "inputs/graph").mkdir(parents=True)
    (tmp_path / "inputs/graph/dev1.txt").symlink_to(kg / "conceptnet_ckbc_dev1.txt")
    params["graph"].update(source="conceptnet", conceptnet=[str(kg / "conceptnet_ckbc_dev1.txt")],
                           min_node_count=1, min_edge_count=1, max_degree=0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as stop:  # cli.run: one error line, exit 2
        _run_stage(tmp_path, monkeypatch, "--out", "data/graph", "--metrics", "m.json")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "graph.conceptnet[0] = " in err and "is read by stage 'graph' but is not one of its deps" in err
    assert not (tmp_path / "data").exists()
    params["graph"]["conceptnet"] = ["inputs/graph/dev1.txt"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _run_stage(tmp_path, monkeypatch, "--out", "data/graph", "--metrics", "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["source"] == "conceptnet" and m["n_edges"] == 600 and "language_check" not in m
