"""kNN-LM: hand-computed p_kNN, interpolation limits, datastore keys/resume, index recall."""

import json
import math

import numpy as np
import pytest
import torch

from beyondlm.config import ConfigError
from beyondlm.logprobs import sequence_logps
from beyondlm.lookup import (
    build_datastore,
    build_index,
    datastore_keys,
    evaluate_knnlm,
    forward_keys,
    interpolate,
    key_module,
    knn_logprobs,
    load_datastore,
    load_index,
    recall_at_k,
    save_index,
)
from beyondlm.lookup.datastore import _key_rows
from beyondlm.lookup.knnlm import exact_distances, retrieve
from tests.helpers import tiny_setup


@pytest.fixture(scope="module")
def tiny():
    language, tok, model = tiny_setup()
    model.eval()
    rng = np.random.default_rng(0)
    train = [[tok.bos_token_id, *s] for s in language.sample(400, rng)]  # ~4k keys
    held_out = [[tok.bos_token_id, *s] for s in language.sample(50, rng)]
    return tok, model, train, held_out


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    _, model, train, _ = tiny
    out = tmp_path_factory.mktemp("ds") / "ds"
    build_datastore(model, train, out, batch_size=64, chunk_tokens=1000)
    return load_datastore(out)


# ----------------------------------------------------------------------------- p_kNN, mixing
def test_knn_logprobs_hand_computed():
    # 3 neighbours at d = 1, 2, 3 with tokens 4, 7, 4: w ∝ e^-1, e^-2, e^-3
    d = torch.tensor([[1.0, 2.0, 3.0]])
    v = torch.tensor([[4, 7, 4]])
    z = math.exp(-1) + math.exp(-2) + math.exp(-3)
    got = knn_logprobs(d, v, vocab_size=8, temperature=1.0)[0]
    assert got[4].item() == pytest.approx(math.log((math.exp(-1) + math.exp(-3)) / z), abs=1e-6)
    assert got[7].item() == pytest.approx(math.log(math.exp(-2) / z), abs=1e-6)
    assert torch.isneginf(got[[0, 1, 2, 3, 5, 6]]).all()
    # τ = 2 halves the distances: w ∝ e^-0.5, e^-1, e^-1.5
    z2 = math.exp(-0.5) + math.exp(-1) + math.exp(-1.5)
    got2 = knn_logprobs(d, v, vocab_size=8, temperature=2.0)[0]
    assert got2[7].item() == pytest.approx(math.log(math.exp(-1) / z2), abs=1e-6)


def test_knn_logprobs_far_neighbours_and_missing_results():
    # distances 1e4 apart would underflow a plain softmax-then-sum; inf = faiss "no result"
    d = torch.tensor([[5000.0, 15000.0, math.inf]])
    got = knn_logprobs(d, torch.tensor([[1, 2, 0]]), vocab_size=3)[0]
    assert got[1].item() == pytest.approx(0.0, abs=1e-6)
    assert got[2].item() == pytest.approx(-10000.0, rel=1e-6)
    assert torch.isneginf(got[0])


def test_interpolate_limits_and_normalization():
    torch.manual_seed(0)
    lm = torch.log_softmax(torch.randn(5, 10), -1)
    knn = knn_logprobs(torch.rand(5, 4) * 3, torch.randint(0, 10, (5, 4)), vocab_size=10)
    assert torch.equal(interpolate(lm, knn, 0.0), lm)
    assert torch.equal(interpolate(lm, knn, 1.0), knn)
    for lam in (0.1, 0.25, 0.5, 0.9):
        mix = interpolate(lm, knn, lam)
        assert torch.allclose(torch.logsumexp(mix, -1), torch.zeros(5), atol=1e-5)
        assert torch.allclose(mix.exp(), lam * knn.exp() + (1 - lam) * lm.exp(), atol=1e-6)
    with pytest.raises(ValueError):
        interpolate(lm, knn, 1.5)


# ----------------------------------------------------------------------------- datastore
def test_keys_are_the_last_ffn_input(tiny, store):
    tok, model, train, _ = tiny
    assert key_module(model) is model.transformer.h[-1].ln_2
    captured = {}
    handle = model.transformer.h[-1].mlp.register_forward_pre_hook(lambda _m, args: captured.update(x=args[0]))
    offset = 0
    try:
        for seq in train[:3]:  # one unpadded sequence at a time, FFN input captured independently
            with torch.no_grad():
                model(input_ids=torch.tensor([seq]))
            n = len(seq) - 1
            expect = captured["x"][0, :n].numpy()  # (n, D)
            np.testing.assert_allclose(store.keys[offset : offset + n], expect, rtol=2e-3, atol=2e-3)
            assert store.values[offset : offset + n].tolist() == seq[1:]
            offset += n
    finally:
        handle.remove()
    assert store.keys.dtype == np.float16 and store.values.dtype == np.int32
    assert store.info.n_keys == sum(len(s) - 1 for s in train) and store.info.dim == 32


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown architecture Linear"):
        key_module(torch.nn.Linear(2, 2))


def test_datastore_keys_stop_at_the_key_module(tiny):
    _, model, train, _ = tiny
    batch = train[:5]
    _, keys, labels, _ = forward_keys(model, batch)  # the full forward pass, logits included
    head_calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    try:
        k16, values = datastore_keys(model, batch)
    finally:
        handle.remove()
    assert head_calls == []  # the forward pass ended at the key module: no LM head
    assert k16.dtype == torch.float16 and torch.equal(values, labels)
    np.testing.assert_array_equal(k16.numpy(), keys.numpy().astype(np.float16))
    assert not key_module(model)._forward_hooks  # hook removed, the exception swallowed
    assert model(input_ids=torch.tensor([batch[0]])).logits.shape[1] == len(batch[0])


def test_build_rows_follow_input_order_whatever_the_batching(tiny, tmp_path):
    # batches are sorted by length inside a chunk, rows stay in input order; texts of < 2 tokens
    # give no key and no batch (an all-empty batch would not run)
    _, model, train, _ = tiny
    seqs = [train[0][:1], *train[:30], [], train[1][:1]]
    build_datastore(model, seqs, tmp_path / "one", batch_size=1, chunk_tokens=10**6)  # unpadded
    build_datastore(model, seqs, tmp_path / "many", batch_size=7, chunk_tokens=100)
    one, many = load_datastore(tmp_path / "one"), load_datastore(tmp_path / "many")
    assert one.values.tolist() == many.values.tolist() == [t for s in seqs for t in s[1:]]
    np.testing.assert_allclose(many.keys, one.keys, rtol=2e-3, atol=2e-3)
    # rows of sequences 3, 0, 2, 1 with 4, 3, 0, 2 keys, hand-written
    assert _key_rows(np.array([0, 3, 5, 5, 9]), np.array([3, 0, 2, 1])).tolist() == [5, 6, 7, 8, 0, 1, 2, 3, 4]


def test_build_resumes_after_interruption(tiny, tmp_path):
    _, model, train, _ = tiny
    seqs = train[:40]
    straight = build_datastore(model, seqs, tmp_path / "a", batch_size=8, chunk_tokens=60)

    def stop(n_seqs, n_keys):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_datastore(model, seqs, tmp_path / "b", batch_size=8, chunk_tokens=60, on_chunk=stop)
    assert (tmp_path / "b/progress.json").exists() and not (tmp_path / "b/meta.json").exists()
    with pytest.raises(ConfigError, match="incomplete"):
        load_datastore(tmp_path / "b")
    chunks = []
    resumed = build_datastore(model, seqs, tmp_path / "b", batch_size=8, chunk_tokens=60,
                              on_chunk=lambda s, n: chunks.append(s))
    n_chunks = []
    build_datastore(model, seqs, tmp_path / "c", batch_size=8, chunk_tokens=60, resume=False,
                    on_chunk=lambda s, n: n_chunks.append(s))
    assert resumed == straight and len(chunks) == len(n_chunks) - 1 > 0  # the first chunk was not redone
    a, b = load_datastore(tmp_path / "a"), load_datastore(tmp_path / "b")
    assert np.array_equal(a.keys, b.keys) and np.array_equal(a.values, b.values)
    assert not (tmp_path / "b/progress.json").exists()
    # complete: a rerun does nothing; other sequences rebuild
    build_datastore(model, seqs, tmp_path / "b", chunk_tokens=60, on_chunk=lambda s, n: chunks.append(-1))
    assert -1 not in chunks
    assert build_datastore(model, seqs[:5], tmp_path / "b").n_seqs == 5
    other = tiny_setup(seed=1)[2].eval()  # same data, other weights: never resumed into
    assert build_datastore(other, seqs[:5], tmp_path / "b").model_sha != straight.model_sha
    new = load_datastore(tmp_path / "b").keys
    assert new.shape[0] < len(a.keys) and not np.allclose(new, a.keys[: new.shape[0]])


# ----------------------------------------------------------------------------- kNN-LM
def test_one_sequence_datastore_predicts_its_next_tokens(tiny, tmp_path):
    _, model, train, _ = tiny
    seq = max(train, key=len)
    build_datastore(model, [seq], tmp_path / "one", batch_size=1, chunk_tokens=100)
    ds = load_datastore(tmp_path / "one")
    index = build_index(ds.keys, kind="flat")
    logits, queries, labels, _ = forward_keys(model, [seq])
    dist, toks = retrieve(index, ds.values, queries, k=3, exact_keys=ds.keys)
    knn = interpolate(torch.log_softmax(logits, -1), knn_logprobs(dist, toks, logits.shape[-1]), 1.0)
    assert knn.argmax(-1).tolist() == labels.tolist()
    res = evaluate_knnlm(model, index, ds.values, [seq], lambdas=[0.0, 0.5, 1.0], k=3)
    assert res["knn_hit_rate"] == 1.0
    assert res["perplexity"][1.0] < res["perplexity"][0.5] < res["perplexity"][0.0]


def test_evaluate_lambda_zero_is_the_lm_perplexity(tiny, store):
    tok, model, _, held_out = tiny
    index = build_index(store.keys, kind="flat")
    res = evaluate_knnlm(model, index, store.values, held_out, lambdas=[0.0, 0.25], k=8, batch_size=16)
    logp, n = sequence_logps(model, held_out, pad_id=tok.pad_token_id)
    assert res["n_tokens"] == int(n.sum()) == len(res["token_logps"][0.0])
    assert res["perplexity"][0.0] == pytest.approx(math.exp(-logp.sum().item() / n.sum().item()), rel=1e-5)
    assert not np.isnan(res["knn_token_logps"]).any()  # finite or -inf, never NaN
    assert not np.isnan(res["token_logps"][0.25]).any()


def test_evaluate_scores_are_the_same_retrieval(tiny, store):
    """scores=True: per-position log p_LM(y), log p_kNN(y) equal the λ grid's, features finite."""
    from beyondlm.lookup.gate import GATES, constant_logit, mixture_logps

    _, model, _, held_out = tiny
    index = build_index(store.keys, kind="flat")
    res = evaluate_knnlm(model, index, store.values, held_out, lambdas=[0.0, 0.25], k=8, batch_size=16, scores=True)
    sc = res["scores"]
    assert len(sc.labels) == res["n_tokens"] and sc.labels.dtype == np.int64
    np.testing.assert_allclose(sc.lm_logp, res["token_logps"][0.0], rtol=1e-6)
    np.testing.assert_array_equal(sc.knn_logp, res["knn_token_logps"])
    lm, knn = sc.logps()
    mixed = mixture_logps(lm, knn, constant_logit(0.25, len(lm))).numpy()
    np.testing.assert_allclose(mixed, res["token_logps"][0.25], rtol=1e-5, atol=1e-6)  # fp32 (n, V) vs fp64 (n,)
    assert set(sc.features) == set(GATES["learned"]) and all(np.isfinite(v).all() for v in sc.features.values())
    assert ((sc.features["knn_top_frac"] > 0) & (sc.features["knn_top_frac"] <= 1)).all()


# ----------------------------------------------------------------------------- index recall
def test_recall_on_real_keys(tiny, store, tmp_path, capsys):
    _, model, _, held_out = tiny
    _, queries, _, _ = forward_keys(model, held_out)
    q = queries.numpy()  # (~460, 32) held-out contexts
    flat = build_index(store.keys, kind="flat")
    assert recall_at_k(flat, flat, q, 8) == 1.0
    ivf = dict(kind="ivfpq", nlist=32, m=8, nbits=6, train_size=5000, seed=0, nprobe=8, threads=1)
    plain = recall_at_k(build_index(store.keys, **ivf), flat, q, 8)
    refined = build_index(store.keys, **ivf, refine=True, k_factor=8)
    recall = recall_at_k(refined, flat, q, 8)
    with capsys.disabled():
        print(f"\nrecall@8 on {len(q)} held-out keys: IVF-PQ {plain:.3f}, IVF-PQ+refine {recall:.3f}")
    assert recall >= 0.95  # measured 0.989 (plain IVF-PQ 0.72) on this data
    assert 0 < plain < recall
    save_index(refined, tmp_path / "idx.faiss")
    assert recall_at_k(load_index(tmp_path / "idx.faiss"), flat, q, 8) == recall  # nprobe, k_factor kept
    # exact re-computation from the fp16 keys matches the flat index's distances
    d_flat, ids = flat.search(q, 8)
    np.testing.assert_allclose(exact_distances(q, store.keys, ids), d_flat, rtol=1e-2, atol=1e-2)
    blocked = exact_distances(q, store.keys, ids, max_floats=8 * 32 * 7)  # blocks of 7 rows
    assert np.array_equal(blocked, exact_distances(q, store.keys, ids))


# ----------------------------------------------------------------------------- stages
def test_stages_write_exactly_their_outputs(tiny, tmp_path, monkeypatch):
    import datasets

    from beyondlm.models import save_model
    from stages import datastore as datastore_stage
    from stages import knnlm as knnlm_stage

    tok, model, train, held_out = tiny
    save_model(model, tok, tmp_path / "model")
    for split, seqs in (("train", train[:150]), ("valid", held_out[:20]), ("test", held_out[20:40])):
        datasets.Dataset.from_dict({"input_ids": [s[1:] for s in seqs]}).to_parquet(str(tmp_path / f"data/{split}.parquet"))
    (tmp_path / "params.yaml").write_text(
        "prepare: {out_dir: data}\n"
        "datastore: {model: model, split: train, batch_size: 32, chunk_tokens: 500}\n"
        "knnlm:\n  index: {kind: ivfpq, nlist: 8, m: 4, nbits: 4, train_size: 1000, threads: 1}\n"
        "  k: [4, 8]\n  lambdas: [0, 0.5]\n  recall_queries: 100\n")
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    monkeypatch.setattr("sys.argv", ["x", "--out", "out/ds", "--metrics", "m/ds.json"])
    datastore_stage.main()
    monkeypatch.setattr("sys.argv", ["x", "--datastore", "out/ds", "--index", "out/idx.faiss",
                                      "--metrics", "m/knn.json", "--plot", "m/knn.tsv"])
    knnlm_stage.main()
    new = {p.relative_to(tmp_path).as_posix() for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    assert new == {"out/ds/keys.npy", "out/ds/values.npy", "out/ds/meta.json", "out/idx.faiss",
                   "m/ds.json", "m/knn.json", "m/knn.tsv",
                   "m/ds.timing.json", "m/knn.timing.json"}  # build times: untracked, beside the metrics
    metrics = json.loads((tmp_path / "m/knn.json").read_text())
    assert metrics["valid"]["lm_ppl"] == metrics["valid"]["k"]["8"]["ppl"]["0.0"] > 1
    assert 0 < metrics["index"]["recall@8"] <= 1
    gate = metrics["gate"]  # on by default: fitted on valid, scored on test, at valid's best k
    assert gate["k"] == metrics["valid"]["best"]["k"] and gate["groups_by"] == "train_frequency"
    assert gate["test_ppl"]["lm"] == pytest.approx(metrics["test"]["lm_ppl"], rel=1e-6)
    assert gate["adaptive"]["0.0"]["queries_saved"] == 0 and gate["adaptive"]["0.0"]["ppl"] == gate["test_ppl"]["adaptive"]
    assert all(0 <= m[g] <= 1 for m in gate["mean_lambda"].values() for g in ("all", "frequent", "rare") if m[g] is not None)
