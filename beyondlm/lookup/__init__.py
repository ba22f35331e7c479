"""Look-up language models: the kNN-LM (Khandelwal et al., ICLR 2020).

``datastore``: keys (last block's pre-FFN layer-norm output) and values (next tokens) on disk,
built resumably; ``knnlm``: faiss indexes, p_kNN, log-space interpolation with the LM, evaluation;
``gate``: a learned, context-dependent λ(x) and adaptive retrieval that skips queries.
"""

from beyondlm.lookup.datastore import (
    Datastore,
    DatastoreInfo,
    build_datastore,
    capture_keys,
    datastore_keys,
    forward_keys,
    key_module,
    load_datastore,
)
from beyondlm.lookup.knnlm import (
    build_index,
    evaluate_knnlm,
    interpolate,
    knn_logprobs,
    load_index,
    recall_at_k,
    save_index,
    set_search_params,
)

__all__ = [
    "Datastore", "DatastoreInfo", "build_datastore", "capture_keys", "datastore_keys", "forward_keys",
    "key_module", "load_datastore", "build_index", "evaluate_knnlm", "interpolate", "knn_logprobs",
    "load_index", "recall_at_k", "save_index", "set_search_params",
]
