"""The served model's own code (nin_dist/tracking/served_model.py) at the 224 px of configs/fast.yaml:
its answer, the chunks a request runs in, and the threads each server worker takes.

The model is fast.yaml's network at a tenth of its widths, untrained (what is checked is that the
served graph computes the network, not what it learned), saved as nin-train saves it and loaded
with mlflow.pyfunc.load_model, as `mlflow models serve` loads it.
"""

from __future__ import annotations

import importlib.util
import os

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from helpers import REPO
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from nin_dist.classifier import RawImageClassifier
from nin_dist.config import load_config
from nin_dist.model import build_model
from nin_dist.tracking.saved_model import SERVED_CODE, save_model

FAST = ["model.width=0.1", "train.device=cpu", "model.kernel=torch", "train.compile=false"]


def served_code():
    """served_model.py as a module of its own (as MLflow loads it: by path, not as part of nin_dist)."""
    spec = importlib.util.spec_from_file_location("served_model_under_test", SERVED_CODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fast_model(tmp_path_factory, splits):
    cfg = load_config(REPO / "configs" / "fast.yaml", FAST)
    torch.manual_seed(0)
    net = build_model(cfg.model).portable_copy()
    path = tmp_path_factory.mktemp("fast") / "model"
    save_model(net, splits[1].images[:2], cfg.data, cfg.train.tta, path)
    return cfg, net, path


def test_a_224_px_model_serves_what_its_network_computes_in_chunks_sized_by_its_activations(fast_model, splits):
    cfg, net, path = fast_model
    assert cfg.data.resize == 224 and cfg.train.tta
    loaded = mlflow.pyfunc.load_model(str(path))
    images = splits[1].images[:6]
    answer = loaded.predict(images.numpy())
    with torch.no_grad():
        expected = RawImageClassifier(net, cfg.data, cfg.train.tta)(images[:, None])
    assert answer["label"].tolist() == expected.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor(answer["probabilities"].tolist(), dtype=torch.float64), expected.double(),
                               atol=1e-6, rtol=0)

    # At a tenth of the widths the resized input is the largest tensor an image makes: 224 x 224 values,
    # more than block 1's 10 channels (a tenth of 96) of 54 x 54 (11 x 11, stride 4).
    model = loaded.unwrap_python_model()
    assert model.images_per_call == served_code().VALUES_PER_CALL // (224 * 224) < 1000, "1,000 a call before"


@pytest.mark.parametrize("argv, environ, workers", [
    (["uvicorn", "--host", "127.0.0.1", "--workers", "4", "mlflow.pyfunc.scoring_server.app:app"], {}, 4),
    (["uvicorn", "--workers=3", "app"], {"WEB_CONCURRENCY": "8"}, 3),
    (["gunicorn", "app"], {"WEB_CONCURRENCY": "2"}, 2),
    (["python", "-m", "pytest"], {}, 1),
    (["uvicorn", "--workers", "many"], {}, 1),
])
def test_each_server_worker_takes_its_share_of_the_cores(argv, environ, workers):
    served = served_code()
    assert served.server_workers(argv, environ) == workers
    cores = len(os.sched_getaffinity(0))
    expected = None if workers == 1 else max(1, cores // workers)
    assert served.threads_per_worker(argv, environ) == expected
    assert served.threads_per_worker(argv, environ | {"OMP_NUM_THREADS": "1"}) is None, "the user's choice stands"


def test_loading_the_model_in_a_worker_of_two_sets_torchs_threads(fast_model, monkeypatch):
    """`mlflow models serve -w 2` runs `uvicorn --workers 2 ...`; its workers keep that command line."""
    monkeypatch.setattr("sys.argv", ["uvicorn", "--workers", "2", "mlflow.pyfunc.scoring_server.app:app"])
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(64)
        mlflow.pyfunc.load_model(str(fast_model[2]))
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    finally:
        torch.set_num_threads(threads)


def test_mlflow_hands_the_model_its_input_as_sent_for_the_mark_it_reads(fast_model):
    """The one private MLflow flag the served model rests on (mlflow_internals.inputs_as_sent, MLflow
    bounded in pyproject.toml): the saved MLmodel keeps it through a load, the signature shown stays
    the uint8 tensor, and PyFuncModel.predict hands floats to the model's own check rather than
    enforcing the signature on them (whose error names MLflow's schema, not the images expected)."""
    path = fast_model[2]
    meta = Model.load(str(path / "MLmodel"))
    assert meta._is_signature_from_type_hint()
    assert meta.signature.inputs.to_dict() == [{"type": "tensor",
                                                "tensor-spec": {"dtype": "uint8", "shape": (-1, 28, 28)}}]
    with pytest.raises(MlflowException) as caught:
        mlflow.pyfunc.load_model(str(path)).predict(np.full((1, 28, 28), 0.5))
    assert caught.value.message.startswith("expected uint8 images of shape (N, 28, 28)"), caught.value.message
