"""The run's models: saved into the spool as MLflow models, then logged from their files.

An MLflow model has one signature, whatever flavor loads it, so the run logs two models:

- "model" (`save_model`), the served one, with the single flavor `python_function`: what MLflow's own
  tools use (`mlflow models serve`, `mlflow models predict`, `mlflow.pyfunc.load_model`), and what
  `tracking.register_model` registers. Raw uint8 images in, label, class name and probabilities
  out, with the run's preprocessing and TTA inside. It is a model from code:
  `nin_dist.tracking.served_model` (copied into the model, self-contained) runs the artifact
  `classifier`, a `torch.export` graph of preprocessing + network + softmax (`nin_dist.classifier`).
  Its signature is a uint8 TensorSpec (-1, 28, 28) in, label / class_name / probabilities out;
  MLflow passes inputs to it as sent (`mlflow_internals.inputs_as_sent`), and it refuses bad ones
  itself. Its config holds the class names and the values of the network's largest activation per
  image, which size its chunks.
- "network" (`save_network`), the plain network for PyTorch users (`mlflow.pytorch.load_model`), as
  `mlflow.pytorch.save_model` saves it: the exported graph (`serialization_format="pt2"`), with the
  signature of what it takes, preprocessed float32 inputs [-1, 1, R, R], and answers, logits [-1, 10],
  as `nin-eval` scores it (`nin_dist.model_source` finds it beside the model it is given).

The weights are in both (a NiN of this project is a few MB). Both are saved in the default memory
format and pin their requirements (`model_requirements`).

`log_saved_model` makes such a folder one of the run's models, an MLflow LoggedModel, as
`mlflow.pyfunc.log_model` would: a LoggedModel in the run's experiment with the run's params and
MLflow's context tags; the folder's files as its artifacts, its MLmodel rewritten to name the
LoggedModel and the run; the run's model output at `step`; the run's metrics of that step linked
to it; status READY (FAILED if a request fails midway). It never loads the model: the folder may
come from a run folder on shared storage, and loading an MLflow model runs its code (and a pytorch
pickle would too). The files go as they are, to be loaded by whoever loads the model.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

from nin_dist.tracking.mlflow_internals import context_tags
from nin_dist.tracking.store import MAX_BATCH_METRICS

MLMODEL = "MLmodel"  # the model's description in its folder (YAML)
# The served model's code, copied into the model as a file (never imported here: importing it
# registers its model with MLflow, which is for the process that loads the model).
SERVED_CODE = Path(__file__).with_name("served_model.py")


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (given, so MLflow does not probe imports)."""
    import mlflow.pytorch

    return mlflow.pytorch.get_default_pip_requirements()


def save_model(model, images, data, tta: bool, path: Path) -> None:
    """Save `model` (which must run on the CPU as it is) as the served MLflow model at `path`; `images`
    (raw uint8 test images) are its examples, `data` (the run's `DataConfig`) and `tta` its preprocessing."""
    import mlflow.pyfunc

    from nin_dist.classifier import export_classifier
    from nin_dist.data import CLASSES, to_inputs
    from nin_dist.tracking.mlflow_internals import inputs_as_sent

    _no_progress_bar()
    model = _in_default_layout(model)
    images = images[:2].cpu()
    _, activation_values = _run_measured(model, to_inputs(images, data))
    with tempfile.TemporaryDirectory(prefix="nin-model-") as tmp:
        graph = Path(tmp) / "classifier.pt2"
        export_classifier(model, data, tta, images, graph)
        mlflow.pyfunc.save_model(str(path), python_model=str(SERVED_CODE), artifacts={"classifier": str(graph)},
                                 model_config={"classes": list(CLASSES), "activation_values": activation_values},
                                 signature=inputs_as_sent(served_signature()), input_example=images.numpy(),
                                 pip_requirements=model_requirements())


def save_network(model, images, data, path: Path) -> None:
    """Save `model` (which must run on the CPU as it is) as the plain-network MLflow model at `path`:
    its examples and signature are `images` (raw uint8 test images) preprocessed as `data` says."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from nin_dist.data import to_inputs

    _no_progress_bar()
    model = _in_default_layout(model)
    x = to_inputs(images[:2].cpu(), data)
    with torch.no_grad():
        y = model(x)
    mlflow.pytorch.save_model(model, str(path), signature=infer_signature(x.numpy(), y.numpy()),
                              input_example=x.numpy(), pip_requirements=model_requirements(),
                              serialization_format="pt2")


def _no_progress_bar() -> None:
    # MLflow copies the artifacts into the model with a progress bar on stderr: carriage-return frames in a log file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def served_scores(path: Path, split) -> dict[str, float]:
    """`test/acc` and `test/loss` of the MLflow model saved at `path` over `split`, as MLflow serves it.

    The model is loaded with `mlflow.pyfunc.load_model`, the way `mlflow models serve` loads it, and
    scores the raw images: the numbers are those of what is served (the fp32 CPU graph), not of the
    run's evaluation, which computes in the run's precision (bf16 autocast gives other last digits,
    and now and then another class). The loss is the mean cross-entropy of the served probabilities,
    as `nin_dist.evaluate` defines it. Loading may set torch's threads (`served_model`): they are put
    back. Only for a folder this process has just saved: loading a model runs its code.
    """
    import mlflow.pyfunc
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    try:
        answer = mlflow.pyfunc.load_model(str(path)).predict(split.images.cpu().numpy())
    finally:
        torch.set_num_threads(threads)
    labels = split.labels.cpu().numpy()
    probabilities = np.array(answer["probabilities"].tolist())
    p_true = probabilities[np.arange(len(labels)), labels]
    return {"test/acc": float(np.mean(answer["label"].to_numpy() == labels)),
            "test/loss": float(-np.log(np.maximum(p_true, np.finfo(np.float32).tiny)).mean())}


def served_signature():
    """What the served model takes and answers: uint8 images (-1, 28, 28); label, class name, probabilities."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    from nin_dist.data import IMAGE_SIDE

    inputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, IMAGE_SIDE, IMAGE_SIDE))])
    outputs = Schema([ColSpec(DataType.long, "label"), ColSpec(DataType.string, "class_name"),
                      ColSpec(Array(DataType.double), "probabilities")])
    return ModelSignature(inputs, outputs)


def _run_measured(model, x):
    """(model(x), the values of the largest tensor any layer of `model` makes for one image of `x`):
    the served model sizes its chunks by the latter (`served_model.VALUES_PER_CALL`)."""
    import torch

    largest = [x[0].numel()]

    def measure(module, inputs, output):
        largest[0] = max(largest[0], output[0].numel())  # output[0]: one image's

    hooks = [m.register_forward_hook(measure) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return y, largest[0]


def _in_default_layout(model):
    """A copy of `model` whose weights are in the default (contiguous) memory format.

    torch.export's weight packing looks for a contiguous tensor covering its whole storage, and warns
    ("No complete tensor found in the group!") for a weight that is not one, as the k x k conv
    weights of a channels_last model (`train.channels_last`) are not. The saved model is for
    inference on any machine: its weights go in the default layout; the caller's model keeps its own.
    """
    import torch

    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def read_saved_model(folder: Path):
    """The folder's MLmodel as an `mlflow.models.Model` (YAML read with `safe_load`; nothing loaded)."""
    import yaml
    from mlflow.models import Model

    with open(folder / MLMODEL, encoding="utf-8") as f:
        return Model.from_dict(yaml.safe_load(f))


class UnfitModel(ValueError):
    """A saved model that must not be logged: it would not run this project's served code, or its
    network would not load as an exported graph."""


NETWORK_GRAPH = "model.pt2"  # mlflow.pytorch's file for serialization_format="pt2", in its model_data folder


def is_network(saved) -> bool:
    """Whether the MLmodel read as `saved` claims to be a plain network (`save_network`), to be checked
    as one (`check_network`); any other is checked as the served model (`check_served_code`)."""
    return "pytorch" in (saved.flavors or {})


def check_fit(files: Path, saved) -> None:
    """Raise UnfitModel unless the model in `files` (its MLmodel read as `saved`) is one nin-train saves."""
    (check_network if is_network(saved) else check_served_code)(files, saved)


def check_served_code(files: Path, saved) -> None:
    """Raise UnfitModel unless the model in `files` (its MLmodel read as `saved`) loads this
    project's own served_model.py, byte for byte, and no other code.

    A run folder on shared storage may be changed between the run and a replay, and whoever loads
    the logged model runs its code: a replay must not upload code the run did not write. A spool
    written by another version of nin-dist is refused too: replay it with that version.
    """
    flavors = saved.flavors or {}
    pyfunc = flavors.get("python_function") or {}
    if (set(flavors) != {"python_function"} or "python_model" in pyfunc
            or pyfunc.get("loader_module") != "mlflow.pyfunc.loaders.code_model"
            or Path(str(pyfunc.get("model_code_path"))).name != SERVED_CODE.name):
        raise UnfitModel(f"its MLmodel does not serve {SERVED_CODE.name} as nin-train saves it")
    if any(flavor.get("code") for flavor in flavors.values() if isinstance(flavor, dict)):
        raise UnfitModel("its MLmodel adds code paths, which nin-train never saves")
    code = files / SERVED_CODE.name
    if code.is_symlink() or not code.is_file() or code.read_bytes() != SERVED_CODE.read_bytes():
        raise UnfitModel(f"its {SERVED_CODE.name} is not this nin-dist's {SERVED_CODE} (changed after the run "
                         f"saved it, or saved by another version of nin-dist: replay with that one)")


def check_network(files: Path, saved) -> None:
    """Raise UnfitModel unless the model in `files` (its MLmodel read as `saved`) is a plain network
    as `save_network` saves it: MLflow's pytorch flavor with no code, whose data is the exported graph
    alone. mlflow.pytorch loads any `model.pth` beside it with pickle, which runs code: never sent.
    """
    flavors = saved.flavors or {}
    pyfunc, torch_flavor = flavors.get("python_function") or {}, flavors.get("pytorch") or {}
    if set(flavors) != {"python_function", "pytorch"} or pyfunc.get("loader_module") != "mlflow.pytorch":
        raise UnfitModel("its MLmodel is not a plain network as nin-train saves it")
    if pyfunc.get("code") or torch_flavor.get("code"):
        raise UnfitModel("its MLmodel adds code paths, which nin-train never saves")
    data = files / str(torch_flavor.get("model_data"))
    graph = data / NETWORK_GRAPH
    if (data.is_symlink() or not data.is_dir() or data.resolve().parent != files.resolve()
            or [p.name for p in data.iterdir()] != [NETWORK_GRAPH] or graph.is_symlink() or not graph.is_file()):
        raise UnfitModel(f"its network is not the exported graph {NETWORK_GRAPH} alone (a pickle loads as code)")


def log_saved_model(client, run_id: str, folder: Path, saved, name: str, step: int) -> None:
    """Log the model saved in `folder` (its MLmodel read as `saved`) as the run's model `name`.
    UnfitModel, before anything is sent, when a copy of it fails `check_fit`."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    with tempfile.TemporaryDirectory(prefix="nin-model-") as tmp:
        files = Path(tmp) / "model"
        shutil.copytree(folder, files)  # the spool's folder stays as it was, for a resend
        check_fit(files, saved)  # on the copy: what is checked is what is sent
        run = client.get_run(run_id)
        logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                            params=dict(run.data.params), tags=context_tags({}))
        try:
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
            _link_step_metrics(client, run_id, logged.model_id, step)
            saved.artifact_path, saved.run_id = logged.artifact_location, run_id
            saved.model_uuid = saved.model_id = logged.model_id
            saved.save(str(files / MLMODEL))
            client.log_model_artifacts(logged.model_id, str(files))
        except BaseException:
            try:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            except Exception:  # the store is away: the model stays PENDING, and a resend logs a new one
                pass
            raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _link_step_metrics(client, run_id: str, model_id: str, step: int) -> None:
    """The run's metrics at `step`, linked to the model (what `mlflow.pytorch.log_model` does): of a
    metric logged more than once at that step, the latest, the value MLflow shows for the run (the
    served model's `test/acc` comes after the evaluation's at the same step: `MLflowTracker.log_model`)."""
    from mlflow.entities import Metric

    latest = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            if m.step == step and m.model_id is None and (key not in latest or m.timestamp >= latest[key].timestamp):
                latest[key] = m
    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=m.dataset_name,
                      dataset_digest=m.dataset_digest, run_id=run_id) for m in latest.values()]
    for lo in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[lo: lo + MAX_BATCH_METRICS])
