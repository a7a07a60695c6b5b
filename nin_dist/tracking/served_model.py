"""What MLflow runs to serve the logged model: raw Fashion-MNIST images in; label, class name and
probabilities out.

MLflow copies this file into the model folder (`mlflow.pyfunc.save_model(python_model=<this file>)`,
a "model from code", `nin_dist.tracking.saved_model`) and runs it when `mlflow.pyfunc.load_model`,
`mlflow models serve` or `mlflow models predict` loads the model. It imports numpy, pandas, torch and
mlflow only, never `nin_dist`, on purpose: the model then works wherever MLflow and torch are
installed, without this project, and loading it unpickles nothing (a pickled PythonModel would name
this package's classes and need it importable). The network and the run's preprocessing are one
`torch.export` graph, the artifact `classifier` (`nin_dist.classifier`); the class names come in
the model's config (`model_config["classes"]`).

Input: the images as the IDX files hold them: uint8, shape (N, 28, 28) or (N, 1, 28, 28). From JSON
(`{"inputs": [...]}`), nested lists of integers 0-255. Anything else is refused before the network
runs, with one line naming what was expected: an `MlflowException` of INVALID_PARAMETER_VALUE, which
the scoring server answers with HTTP 400. Floats are refused even when whole: pixels scaled to
[0, 1] or normalised are the usual mistake, and would otherwise be read as near-black images.

Output: a DataFrame, one row per image: `label` (class index), `class_name` and `probabilities`
(the 10 softmax values, in class order).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

SIDE = 28  # Fashion-MNIST's images: 28 x 28 pixels, one channel
EXPECTED = (f"uint8 images of shape (N, {SIDE}, {SIDE}) or (N, 1, {SIDE}, {SIDE}) with values 0-255, as "
            f"Fashion-MNIST's IDX files hold them (JSON: nested lists of integers)")
CHUNK = 1000  # images per call of the graph: bounds the memory of a large request


def refuse(got: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"expected {EXPECTED}; got {got}")


def as_images(data) -> np.ndarray:
    """`data` as uint8 [N, 1, 28, 28], or the MlflowException saying what is wrong with it."""
    if isinstance(data, pd.DataFrame):  # e.g. CSV, or JSON's dataframe_split: rows lose the image's shape
        raise refuse(f"a table of {len(data.columns)} columns (send {{\"inputs\": [...]}} JSON or an array)")
    if isinstance(data, list):
        try:
            array = np.array(data)
        except (ValueError, OverflowError) as err:  # ragged lists, integers beyond int64
            raise refuse(f"lists that are not a rectangular array of numbers ({str(err).splitlines()[0]})") from None
        if array.dtype.kind in "iu" and array.size and (array.min() < 0 or array.max() > 255):
            raise refuse(f"values from {array.min()} to {array.max()}")
        if array.dtype.kind not in "iu" and array.size:
            raise refuse(f"{_kind(array)} (send the raw pixel integers, not scaled or normalised ones)")
        array = array.astype(np.uint8) if array.dtype.kind in "iu" else array
    elif isinstance(data, np.ndarray):
        array = data
        if array.dtype != np.uint8:
            raise refuse(f"a {array.dtype} array" + (" (send the raw pixel integers, not scaled or normalised ones)"
                                                     if array.dtype.kind == "f" else ""))
    else:
        raise refuse(f"a {type(data).__name__}")
    shape = array.shape
    if not (len(shape) in (3, 4) and shape[-2:] == (SIDE, SIDE) and (len(shape) == 3 or shape[1] == 1)
            and shape[0] >= 1):
        raise refuse(f"shape {shape}")
    return np.ascontiguousarray(array.reshape(-1, 1, SIDE, SIDE), dtype=np.uint8)


def _kind(array: np.ndarray) -> str:
    names = {"f": "floats", "b": "booleans", "U": "strings", "S": "strings", "O": "mixed values"}
    return names.get(array.dtype.kind, f"{array.dtype} values")


class FashionClassifier(PythonModel):
    """The pyfunc model: `predict(images)` -> DataFrame of label, class_name, probabilities."""

    def load_context(self, context) -> None:
        self.graph = torch.export.load(context.artifacts["classifier"]).module()
        self.classes = list(context.model_config["classes"])

    # The hint is the one MLflow reads as "no schema from type hints" without a warning; JSON comes as
    # nested lists, which `as_images` makes one array (the schema is the model's signature).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = torch.from_numpy(as_images(model_input))
        with torch.no_grad():
            p = torch.cat([self.graph(images[lo: lo + CHUNK]) for lo in range(0, len(images), CHUNK)])
        labels = p.argmax(1).tolist()
        return pd.DataFrame({"label": labels, "class_name": [self.classes[k] for k in labels],
                             "probabilities": p.tolist()})


set_model(FashionClassifier())
