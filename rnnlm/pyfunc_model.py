"""The code of the registered MLflow pyfunc ("model from code": nothing is pickled).

MLflow runs this file when it loads the model; ``set_model`` names the object to serve.
Input: a column ``prefix``; params ``num_chars``, ``temperature`` (0 = greedy, the chapter's
``predict_ch8``), ``top_k`` (0 = all characters), ``seed``. Output: a column ``text``.
A request out of bounds (:class:`rnnlm.generate.Limits`) is answered 400, naming the parameter.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from rnnlm.artifacts import read_model_dir
from rnnlm.generate import Limits, RequestError, check_request, generate


class RnnlmPyfunc(PythonModel):
    def load_context(self, context):
        self.module, self.vocab = read_model_dir(Path(context.artifacts["model_dir"]))
        self.limits = Limits.from_env()

    # No type hints here: MLflow would try to derive a schema from them; the signature is
    # given explicitly at registration (rnnlm.registry.signature).
    def predict(self, context, model_input, params=None):
        import pandas as pd

        params = params or {}
        prefixes = [str(p) for p in model_input["prefix"]]
        num_chars, temperature = (
            int(params.get("num_chars", 50)),
            float(params.get("temperature", 0)),
        )
        top_k, seed = int(params.get("top_k", 0)), int(params.get("seed", 0))
        try:  # MlflowException: the server answers 400 with this message
            check_request(prefixes, num_chars, temperature, top_k, self.limits)
            if unknown := sorted({ch for p in prefixes for ch in self.vocab.unknown(p)}):
                raise RequestError("prefix", f"characters outside the vocabulary: {unknown}")
        except RequestError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        texts = generate(
            self.module, self.vocab, prefixes, num_chars, temperature, top_k or None, seed
        )
        return pd.DataFrame({"text": texts})


mlflow.models.set_model(RnnlmPyfunc())
