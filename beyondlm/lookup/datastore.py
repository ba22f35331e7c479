"""The kNN-LM datastore: (key, value) = (context representation, next token) for every training token.

Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language Models"
(ICLR 2020), §2: for each training context c_t = x_<t the datastore holds the pair
``(f(c_t), x_t)``. Following their §5 ablation (dev ppl 16.06 with the input of the final FFN
after its layer norm, vs 16.76 for the attention-block input and 17.07 for the model output),
``f`` is the OUTPUT of the last transformer block's pre-FFN layer norm — for GPT-2
``model.transformer.h[-1].ln_2`` — captured with a forward hook (see :func:`key_module`).

On disk (``out_dir``): ``keys.npy`` float16 (N, D) and ``values.npy`` int32 (N,), memory-mapped
(``np.lib.format.open_memmap``) and filled chunk by chunk; ``progress.json`` records how many
sequences are done so a killed build resumes; ``meta.json`` is written last — the directory is
complete iff ``meta.json`` exists. fp16 halves the memory of keys that grow linearly with the
training tokens (the paper's recommendation); distances are computed in fp32.

Sequences follow :mod:`beyondlm.logprobs`: ``[BOS] x_1 .. x_n``; a sequence of length L gives
L − 1 keys, rows in input order, positions ascending.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from beyondlm.config import ConfigError
from beyondlm.inputs import InputError, load_npy, read_json, reading, restore_fix
from beyondlm.io import write_json
from beyondlm.logprobs import lm_targets, pad_batch

log = logging.getLogger(__name__)

# Architecture (``type(model).__name__``) → the module whose OUTPUT is the key: the last block's
# pre-FFN layer norm. Add a line here to plug in another architecture.
KEY_MODULES: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {
    "GPT2LMHeadModel": lambda m: m.transformer.h[-1].ln_2,
    "LlamaForCausalLM": lambda m: m.model.layers[-1].post_attention_layernorm,
    "MistralForCausalLM": lambda m: m.model.layers[-1].post_attention_layernorm,
    "Qwen2ForCausalLM": lambda m: m.model.layers[-1].post_attention_layernorm,
}


def key_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the kNN-LM key (input of the last FFN, after its layer norm)."""
    arch = type(model).__name__
    if arch not in KEY_MODULES:
        raise ConfigError(
            f"kNN-LM keys: unknown architecture {arch}; known: {', '.join(KEY_MODULES)}. Add an "
            "entry to beyondlm.lookup.datastore.KEY_MODULES returning the last block's pre-FFN norm"
        )
    return KEY_MODULES[arch](model)


class _KeysCaptured(Exception):
    """Raised by the key hook of ``capture_keys(stop=True)`` to end the forward pass early."""


@contextlib.contextmanager
def capture_keys(model: torch.nn.Module, *, stop: bool = False) -> Iterator[dict[str, Tensor]]:
    """While active, every forward pass stores the key module's output (B, T, D) in ``["keys"]``.

    ``stop``: end each forward pass right there (the hook raises, the context swallows it): the
    datastore needs no logits, and the rest of the last block, the final norm and the LM head are
    about half the FLOPs of the default tiny model (n_embd 64, 2 layers, V 502), plus the (n, V)
    logits tensor. Run the model as the last statement inside the ``with`` block.
    """
    store: dict[str, Tensor] = {}

    def hook(_module, _inputs, out):
        store["keys"] = out
        if stop:
            raise _KeysCaptured

    handle = key_module(model).register_forward_hook(hook)
    try:
        yield store
    except _KeysCaptured:
        pass  # the forward pass ended at the key module on purpose
    finally:
        handle.remove()


@torch.no_grad()
def forward_keys(model, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One padded forward pass → ``(logits (n, V), keys (n, D) fp32, labels (n,), lengths (B,))``
    over the n scored positions (row-major: sequence by sequence, positions ascending)."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, attn = pad_batch(seqs, pad_id, device)
    labels, mask = lm_targets(ids, attn)  # (B, T-1) each
    with capture_keys(model) as store:
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
    keys = store["keys"][:, :-1]  # (B, T-1, D): the key at position t predicts x_{t+1}
    return logits[mask].float(), keys[mask].float(), labels[mask], mask.sum(-1)


@torch.inference_mode()
def datastore_keys(model, seqs: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """``(keys (n, D) float16, values (n,))`` of ``forward_keys`` without the logits: the forward
    pass stops at the key module (``capture_keys(stop=True)``). Rows as in ``forward_keys``."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, attn = pad_batch(seqs, pad_id, device)
    labels, mask = lm_targets(ids, attn)  # (B, T-1) each
    with capture_keys(model, stop=True) as store:
        model(input_ids=ids, attention_mask=attn, use_cache=False)
    keys = store["keys"][:, :-1]  # (B, T-1, D): the key at position t predicts x_{t+1}
    return keys[mask].to(torch.float16), labels[mask]


@dataclass(frozen=True)
class DatastoreInfo:
    """``meta.json``: N keys of dimension D from ``model``; ``fingerprint`` hashes the token data
    and ``model_sha`` the weights, so a resumed build never mixes data or models."""

    n_keys: int
    dim: int
    n_seqs: int
    model: str
    dtype: str
    fingerprint: str
    model_sha: str


def fingerprint(seqs: Sequence[Sequence[int]]) -> str:
    """sha256 over lengths and tokens: a resumed build must see exactly the same sequences."""
    h = hashlib.sha256()
    h.update(np.asarray([len(s) for s in seqs], dtype=np.int64).tobytes())
    for s in seqs:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def model_sha(model: torch.nn.Module) -> str:
    """sha256 over the parameters' bytes (seconds for a 100M model; the forward passes cost more)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def build_datastore(model, seqs: Sequence[Sequence[int]], out_dir: str | Path, *, batch_size: int = 256,
                    chunk_tokens: int = 65536, resume: bool = True, model_name: str | None = None,
                    on_chunk: Callable[[int, int], None] | None = None) -> DatastoreInfo:
    """Write keys (N, D) fp16 and values (N,) int32 for ``seqs`` (each ``[BOS] x_1..x_n``).

    Sequences are processed in input order in chunks of about ``chunk_tokens`` keys (inside a
    chunk, batches of ``batch_size`` sequences of similar length, see ``_write_chunk``; the
    forward pass stops at the key module); after each chunk the memmaps are flushed,
    ``progress.json`` is updated and ``on_chunk(n_seqs_done, n_keys_done)`` is called. With ``resume`` a rerun skips the
    sequences ``progress.json`` records as done (and returns at once if ``meta.json`` exists).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.asarray([max(len(s) - 1, 0) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])  # (S+1,): first key row of each sequence
    info = DatastoreInfo(int(offsets[-1]), int(model.config.hidden_size), len(seqs),
                         model_name or str(model.config.name_or_path or type(model).__name__),
                         "float16", fingerprint(seqs), model_sha(model))
    done = _resume_point(out, info) if resume else 0
    if done is None:  # already complete
        return info
    keys, values = _open_arrays(out, info, fresh=done == 0)
    bar = tqdm(total=info.n_keys, initial=int(offsets[done]), unit="key", desc="datastore")
    was_training = model.training
    model.eval()
    try:
        while done < len(seqs):
            end = int(np.searchsorted(offsets, offsets[done] + chunk_tokens, side="right")) - 1
            end = min(max(end, done + 1), len(seqs))  # at least one sequence per chunk
            _write_chunk(model, seqs, np.arange(done, end), offsets, keys, values, batch_size, bar)
            keys.flush(), values.flush()
            done = end
            write_json(out / "progress.json", {**asdict(info), "n_seqs_done": done,
                                               "n_keys_done": int(offsets[done])})
            if on_chunk is not None:
                on_chunk(done, int(offsets[done]))
    finally:
        bar.close()
        model.train(was_training)
    del keys, values
    write_json(out / "meta.json", asdict(info))
    (out / "progress.json").unlink(missing_ok=True)
    return info


def _write_chunk(model, seqs, chunk: np.ndarray, offsets: np.ndarray, keys, values, batch_size: int,
                 bar) -> None:
    """Keys and values of the sequences ``chunk`` into their rows ``offsets[i]:offsets[i+1]``.

    Batches take the chunk's sequences longest first, so each pads to about its own length: in
    input order a batch of 64 pads to its longest text, 2.85× the real tokens on the default
    synthetic train split (mean 21, max 65 tokens), vs 1.01× sorted. Sequences with no key
    (fewer than 2 tokens) are skipped, so no batch is all padding.
    """
    n_keys = offsets[chunk + 1] - offsets[chunk]  # (S,)
    order = chunk[np.argsort(-n_keys, kind="stable")]
    order = order[offsets[order + 1] > offsets[order]]
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]  # (b,) sequence numbers
        k, v = datastore_keys(model, [seqs[i] for i in idx])  # (n, D) fp16, (n,)
        rows = _key_rows(offsets, idx)  # (n,): sequence by sequence, positions ascending
        keys[rows] = k.cpu().numpy()
        values[rows] = v.cpu().numpy()
        bar.update(len(rows))


def _key_rows(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Datastore rows of sequences ``idx`` (b,), concatenated: offsets[i] .. offsets[i+1]−1 each."""
    starts, lens = offsets[idx], offsets[idx + 1] - offsets[idx]  # (b,) each
    first = np.cumsum(lens) - lens  # (b,): where each sequence begins in the batch's rows
    return np.repeat(starts - first, lens) + np.arange(int(lens.sum()))


def _resume_point(out: Path, info: DatastoreInfo) -> int | None:
    """Sequences already done (0 = start over); None if ``out`` already holds this datastore."""
    meta, progress = out / "meta.json", out / "progress.json"
    try:
        if meta.exists():
            if read_json(meta) == asdict(info):
                return None
            meta.unlink()  # a different datastore: rebuild
        if progress.exists():
            state = read_json(progress)
            if {k: state.get(k) for k in asdict(info)} == asdict(info):
                return int(state["n_seqs_done"])
    except InputError as err:  # a record we cannot read proves nothing: rebuild
        log.warning("rebuilding the datastore: %s", err)
    return 0


def _open_arrays(out: Path, info: DatastoreInfo, *, fresh: bool):
    """Preallocated memmaps ``keys.npy`` (N, D) fp16 and ``values.npy`` (N,) int32."""
    (out / "meta.json").unlink(missing_ok=True)
    mode = "w+" if fresh else "r+"
    if fresh:
        (out / "progress.json").unlink(missing_ok=True)
    keys = np.lib.format.open_memmap(out / "keys.npy", mode=mode, dtype=np.float16, shape=(info.n_keys, info.dim))
    values = np.lib.format.open_memmap(out / "values.npy", mode=mode, dtype=np.int32, shape=(info.n_keys,))
    return keys, values


@dataclass(frozen=True)
class Datastore:
    path: Path
    info: DatastoreInfo
    keys: np.ndarray  # (N, D) float16, memory-mapped read-only
    values: np.ndarray  # (N,) int32, memory-mapped read-only


def load_datastore(path: str | Path) -> Datastore:
    """Open a complete datastore; an unfinished one (no ``meta.json``) raises ConfigError."""
    path = Path(path)
    if not (path / "meta.json").exists():
        state = " (build interrupted: progress.json present)" if (path / "progress.json").exists() else ""
        raise ConfigError(
            f"datastore {path} is incomplete: no meta.json{state}. Rerun build_datastore on the "
            "same sequences with resume=True (dvc repro datastore) to finish it"
        )
    fix = restore_fix(path, "datastore")
    with reading(path / "meta.json", "datastore record", fix):
        info = DatastoreInfo(**read_json(path / "meta.json", fix))
    keys, values = load_npy(path / "keys.npy", fix), load_npy(path / "values.npy", fix)
    if keys.shape != (info.n_keys, info.dim) or values.shape != (info.n_keys,):
        raise InputError(path, f"arrays {keys.shape}/{values.shape} disagree with meta.json", fix)
    return Datastore(path, info, keys, values)


@dataclass(frozen=True)
class DatastoreConfig:
    """``datastore`` params section: which model's keys over which prepared split."""

    model: str = "models/sft/mle-s0"  # HF model dir (also a DVC dep of the stage)
    split: str = "train"
    max_seqs: int = 0  # 0 = the whole split
    # sequences per forward pass (of similar length: little padding). 256 vs 64: 1.6 vs 0.6M keys/min
    # with the tiny default model on 2 busy cores; lower it for long texts or big models (memory)
    batch_size: int = 256
    chunk_tokens: int = 262144  # keys between flushes / progress records (resume granularity)

    def __post_init__(self) -> None:
        from beyondlm.config import check_choice, check_range

        check_choice("datastore.split", self.split, ("train", "valid", "test"))
        check_range("datastore.max_seqs", self.max_seqs, 0, 10**9)
        check_range("datastore.batch_size", self.batch_size, 1, 10**6)
        check_range("datastore.chunk_tokens", self.chunk_tokens, 1, 10**12)
