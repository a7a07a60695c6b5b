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

Input: the images as the IDX files hold them: integers 0-255 of shape (N, 28, 28) or (N, 1, 28, 28),
a NumPy array of any integer dtype (uint8 as read from the files, read-only ones included, or int64)
or, from JSON (`{"inputs": [...]}`), nested lists of integers. Anything else is refused before the
network runs, with one line naming what was expected: an `MlflowException` of INVALID_PARAMETER_VALUE,
which the scoring server answers with HTTP 400. Floats are refused even when whole: pixels scaled to
[0, 1] or normalised are the usual mistake, and would otherwise be read as near-black images.

Output: a DataFrame, one row per image: `label` (class index), `class_name` and `probabilities`
(the 10 softmax values, in class order).

Memory and threads. A request runs the graph on chunks sized by the network's largest activation
(`model_config["activation_values"]`, values per image, from the run's resize and widths), so a
request of 224-px images holds no more than one of 28 px does. `mlflow models serve -w N` starts N
worker processes (`uvicorn --workers N`), each of which would take all the machine's cores: each
takes its share instead, unless `OMP_NUM_THREADS` says otherwise.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

SIDE = 28  # Fashion-MNIST's images: 28 x 28 pixels, one channel
EXPECTED = (f"uint8 images of shape (N, {SIDE}, {SIDE}) or (N, 1, {SIDE}, {SIDE}) with values 0-255, as "
            f"Fashion-MNIST's IDX files hold them (JSON: nested lists of integers)")
# Values of the network's largest activation in one call of the graph (64 MB in fp32); a call holds a
# few tensors of about that size at once, whatever the request's size.
VALUES_PER_CALL = 1 << 24


def refuse(got: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"expected {EXPECTED}; got {got}")


def as_images(data) -> np.ndarray:
    """`data` as a writable uint8 array [N, 1, 28, 28], or the MlflowException saying what is wrong with it."""
    if isinstance(data, pd.DataFrame):  # e.g. CSV, or JSON's dataframe_split: rows lose the image's shape
        raise refuse(f"a table of {len(data.columns)} columns (send {{\"inputs\": [...]}} JSON or an array)")
    if isinstance(data, list):
        try:
            array = np.array(data)
        except (ValueError, OverflowError) as err:  # ragged lists, integers beyond int64
            raise refuse(f"lists that are not a rectangular array of numbers ({str(err).splitlines()[0]})") from None
        what = _kind(array)
    elif isinstance(data, np.ndarray):
        array, what = data, f"a {data.dtype} array"
    else:
        raise refuse(f"a {type(data).__name__}")
    if array.size and array.dtype.kind not in "iu":
        raise refuse(what + (" (send the raw pixel integers, not scaled or normalised ones)"
                             if array.dtype.kind == "f" else ""))
    if array.size and array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise refuse(f"values from {array.min()} to {array.max()}")
    shape = array.shape
    if not (len(shape) in (3, 4) and shape[-2:] == (SIDE, SIDE) and (len(shape) == 3 or shape[1] == 1)
            and shape[0] >= 1):
        raise refuse(f"shape {shape}")
    images = np.ascontiguousarray(array.reshape(-1, 1, SIDE, SIDE), dtype=np.uint8)
    # A read-only array (np.frombuffer over the IDX bytes) would make torch.from_numpy warn that it is
    # not writable; the graph never writes to it, but a copy (784 bytes an image) keeps the user's log clean.
    return images if images.flags.writeable else images.copy()


def server_workers(argv: list[str], environ) -> int:
    """How many processes serve the model: uvicorn's `--workers N` (`mlflow models serve -w N` runs
    `uvicorn --workers N ...`, and the worker processes uvicorn spawns keep its command line in
    sys.argv), else `$WEB_CONCURRENCY` (uvicorn's own default for it), else 1."""
    value = environ.get("WEB_CONCURRENCY")
    for i, arg in enumerate(argv):
        if arg == "--workers" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--workers="):
            value = arg.partition("=")[2]
    try:
        return max(1, int(value or 1))
    except ValueError:
        return 1


def threads_per_worker(argv: list[str], environ) -> int | None:
    """torch's threads for this process: the cores it may run on, shared by the workers; None to
    leave torch as it is (`OMP_NUM_THREADS` set, or one worker, which has the cores to itself)."""
    workers = server_workers(argv, environ)
    if "OMP_NUM_THREADS" in environ or workers == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // workers)


def _kind(array: np.ndarray) -> str:
    names = {"f": "floats", "b": "booleans", "U": "strings", "S": "strings", "O": "mixed values"}
    return names.get(array.dtype.kind, f"{array.dtype} values")


class FashionClassifier(PythonModel):
    """The pyfunc model: `predict(images)` -> DataFrame of label, class_name, probabilities."""

    def load_context(self, context) -> None:
        self.graph = torch.export.load(context.artifacts["classifier"]).module()
        self.classes = list(context.model_config["classes"])
        self.images_per_call = max(1, VALUES_PER_CALL // int(context.model_config["activation_values"]))
        threads = threads_per_worker(sys.argv, os.environ)
        if threads is not None:
            torch.set_num_threads(threads)

    # The hint is the one MLflow reads as "no schema from type hints" without a warning; JSON comes as
    # nested lists, which `as_images` makes one array (the schema is the model's signature).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        images = torch.from_numpy(as_images(model_input))
        with torch.no_grad():
            step = self.images_per_call
            p = torch.cat([self.graph(images[lo: lo + step]) for lo in range(0, len(images), step)])
        labels = p.argmax(1).tolist()
        return pd.DataFrame({"label": labels, "class_name": [self.classes[k] for k in labels],
                             "probabilities": p.tolist()})


set_model(FashionClassifier())
