"""Model directories as MLflow pyfunc models: which directories qualify and how they are logged.

A directory saved with its tokenizer (``beyondlm.models.save_model``: sft, align seeds, reward) is
logged as an :class:`HFModel` pyfunc, ``predict(texts)`` -> one score per text; others (vq: its
own layout, a prior without a tokenizer) stay plain files (``beyondlm.tracking``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# As in beyondlm.tracking: loading a model logged here imports only this module (the pickled
# class), and MLflow's telemetry thread must stay off offline.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.pyfunc import PythonModel  # noqa: E402


def is_hf_model_dir(path: Path) -> bool:
    """A ``save_pretrained`` directory with its tokenizer (``beyondlm.models.save_model``):
    ``config.json`` naming a ``model_type``, safetensors weights, ``tokenizer_config.json``."""
    path = Path(path)
    files = ("config.json", "tokenizer_config.json")
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not all((path / f).is_file() for f in files) or not any((path / f).is_file() for f in weights):
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def holds_hf_models(path: Path) -> bool:
    """A directory with an HF model directory directly inside (``models/align/<method>/s<seed>``):
    its children are logged one by one, so each model dir becomes its own MLflow model."""
    return path.is_dir() and any(is_hf_model_dir(c) for c in path.iterdir())


def _requirements() -> list[str]:
    """Pinned to this environment; explicit, so MLflow does not load the model to infer them."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "transformers", "safetensors", "tokenizers")]


class HFModel(PythonModel):
    """A saved HF model directory with its tokenizer (artifact ``hf``) as an MLflow pyfunc:
    ``predict(texts)`` -> one float per text (encoded ``[BOS] tokens [EOS]``): log p(x) in nats
    under a causal LM, r(x) under a reward model (a sequence-classification head).

    Loading needs this project installed: the class is pickled by reference and scores with
    ``beyondlm``'s own functions.
    """

    def load_context(self, context) -> None:
        from transformers import AutoTokenizer

        from beyondlm.models import load_model

        path = Path(context.artifacts["hf"])
        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        self.kind = "reward" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal"
        self.model = load_model(path, kind=self.kind)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def predict(self, context, model_input: list[str], params=None) -> list[float]:
        from beyondlm.data.tokenization import encode_texts
        from beyondlm.logprobs import sequence_logps
        from beyondlm.reward import score

        seqs = encode_texts(self.tokenizer, model_input, self.model.config.max_position_embeddings - 1)
        pad = self.model.config.pad_token_id
        pad = self.tokenizer.pad_token_id if pad is None else pad  # an LM masks padding: any id does
        if self.kind == "reward":
            return score(self.model, seqs, pad_id=pad).tolist()
        return sequence_logps(self.model, seqs, pad_id=pad)[0].tolist()


def log_model(client, run_id: str, model_dir: Path, rel: str) -> None:
    """``model_dir`` as an :class:`HFModel` pyfunc at artifact path ``rel`` of the run."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(saved, python_model=HFModel(), artifacts={"hf": str(model_dir)},
                                 pip_requirements=_requirements())
        client.log_artifacts(run_id, str(saved), artifact_path=rel)
