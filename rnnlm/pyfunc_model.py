"""The code of the registered MLflow pyfunc ("model from code": nothing is pickled).

MLflow runs this file when it loads the model; ``set_model`` names the object to serve.
Input: a column ``prefix``; params ``num_chars``, ``temperature`` (0 = greedy, the chapter's
``predict_ch8``), ``top_k`` (0 = all characters), ``seed``. Output: a column ``text``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

from rnnlm.artifacts import read_model_dir
from rnnlm.generate import generate


class RnnlmPyfunc(PythonModel):
    def load_context(self, context):
        self.module, self.vocab = read_model_dir(Path(context.artifacts["model_dir"]))

    # No type hints here: MLflow would try to derive a schema from them; the signature is
    # given explicitly at registration (rnnlm.registry.signature).
    def predict(self, context, model_input, params=None):
        import pandas as pd

        params = params or {}
        prefixes = [str(p) for p in model_input["prefix"]]
        unknown = sorted({ch for p in prefixes for ch in self.vocab.unknown(p)})
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {unknown}")
        top_k = int(params.get("top_k", 0))
        texts = generate(
            self.module,
            self.vocab,
            prefixes,
            int(params.get("num_chars", 50)),
            temperature=float(params.get("temperature", 0.0)),
            top_k=top_k or None,
            seed=int(params.get("seed", 0)),
        )
        return pd.DataFrame({"text": texts})


mlflow.models.set_model(RnnlmPyfunc())
