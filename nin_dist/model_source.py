"""What `nin-eval MODEL` names: the model, the run that trained it, and the config that run used.

MODEL is one of

- `models:/m-<id>`: an MLflow LoggedModel (what `nin-train` logs as "model");
- `models:/NAME@ALIAS` or `models:/NAME/VERSION`: a version of a registered model;
- `runs:/<run_id>/model`: the model a run logged, as MLflow resolves it;
- a checkpoint (`RUN/checkpoints/last.pt`), or the run folder `RUN` holding one.

An MLflow model is loaded with `mlflow.pytorch.load_model`: the plain network nin-train logs beside
the model, as the LoggedModel "network" of the same run and step (an exported `pt2` graph, which
MLflow checks to be free of pickles before loading); MODEL names the served model "model" (what is
registered, and what `@best` and `runs:/<run_id>/model` resolve to) or that network itself. The
preprocessing is then done here from the run's config, as the run did it (the served model, which
carries it inside, is what `mlflow models serve` runs). A model with no such network beside it
(logged by an older nin-train, with the network as its own pytorch flavor) is loaded as it is. Its config is the
`config.yaml` its source run logged. A checkpoint is untrusted input: it is read with
`torch.load(weights_only=True)` and its weights go into a NiN rebuilt from the run folder's
`config.yaml` (`RUN/config.yaml` for `RUN/checkpoints/last.pt`); the weights are the moving average
when the run kept one (`train.ema_decay`), since that is the model the run scored and logged.
Either way the stored `tracking` and `run` sections are left out: the store to look in and log to
is this command's own, as it is for nin-train (a run folder may not choose where this environment's
MLflow credentials go).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nin_dist import checkpoint as ckpt
from nin_dist.config import Config, replace
from nin_dist.errors import ModelError, first_line
from nin_dist.model import build_model
from nin_dist.precision import memory_format, param_dtype

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the resolved config, in a run folder and among a run's MLflow artifacts
LOGGED_MODEL_NAME = "model"  # what nin-train names the model it logs (and registers)
NETWORK_MODEL_NAME = "network"  # what nin-train names the plain network it logs beside it
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # `models:`, `s3:`, `https:` ... (not `C:`-like one letter)
_LOGGED_MODEL_ID = re.compile(r"^m-[0-9a-f]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where the model came from; every field but `uri` and `kind` may be unknown (None)."""

    uri: str  # MODEL as given (a checkpoint's path made absolute)
    kind: str  # "mlflow" or "checkpoint"
    model_id: str | None = None  # the MLflow LoggedModel
    run_id: str | None = None  # the MLflow run that trained it
    experiment_id: str | None = None  # the LoggedModel's experiment
    step: int | None = None  # a checkpoint's optimizer steps


@dataclass
class OpenedModel:
    """A model found and read, not yet put on a device: an MLflow model as loaded, or a checkpoint's weights."""

    source: ModelSource
    config_path: Path | None  # the run's config.yaml (downloaded into the caller's folder for MLflow), if found
    loaded: nn.Module | None = None  # an MLflow model, on the CPU
    state: dict[str, torch.Tensor] | None = None  # a checkpoint's state_dict

    def eval_config(self, cfg: Config) -> Config:
        """`cfg` as this model can run it: MLflow's copy is fp32 in the default memory format (what
        nin-train logs for inference), so fp64 becomes fp32 and channels_last is off for it."""
        if self.loaded is None:
            return cfg
        changes = {"channels_last": False} | ({"precision": "fp32"} if cfg.train.precision == "fp64" else {})
        return replace(cfg, train=changes)

    def build(self, cfg: Config, device: torch.device) -> nn.Module:
        """The model on `device`, laid out as the run evaluated it (checkpoints) or as logged (MLflow)."""
        if self.loaded is not None:
            return self.loaded.to(device)
        model = build_model(cfg.model, device).to(dtype=param_dtype(cfg.train), memory_format=memory_format(cfg.train))
        try:
            model.load_state_dict(self.state)
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # e.g. another model.width
            raise ModelError(f"{self.source.uri}: the weights do not fit the network of its config "
                             f"({first_line(err, 200)}); pass the config it was trained with (--config)") from None
        return model


class ExportedModel(nn.Module):
    """A graph exported with `torch.export` (MLflow's `pt2`), fixed in inference mode when it was exported.

    The exported module refuses `train()` and `eval()`; evaluation calls both, and neither would change
    anything here (dropout and BatchNorm were traced in eval mode), so this wrapper keeps the flag only."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModel:
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)


def is_mlflow_uri(text: str) -> bool:
    return text.startswith(("models:/", "runs:/"))


def open_model(text: str, tracking_uri: str, folder: Path) -> OpenedModel:
    """Find and read MODEL `text`; an MLflow model is looked up in `tracking_uri`, its config downloaded
    into `folder`. Raises ModelError (one line) for a URI or path that names no model."""
    if is_mlflow_uri(text):
        return _open_mlflow(text, tracking_uri, folder)
    path = Path(text).expanduser()
    if not path.exists() and _SCHEME.match(text):
        raise ModelError(f"MODEL {text!r} is neither a models:/ or runs:/ URI nor an existing checkpoint path")
    return _open_checkpoint(path)


# --------------------------------------------------------------------------- checkpoints

def _open_checkpoint(path: Path) -> OpenedModel:
    if path.is_dir():  # a run folder: its newest checkpoint
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise ModelError(f"MODEL {path}: no such checkpoint (expected a nin-train checkpoint such as "
                         f"runs/NAME/checkpoints/last.pt, a run folder, or a models:/ or runs:/ URI)")
    path = path.resolve()
    try:
        state = ckpt.load(path)  # weights_only: tensors and plain containers, never code
    except Exception as err:  # anything that is not a readable checkpoint is the user's input
        raise ModelError(f"MODEL {path}: cannot be loaded as a checkpoint ({first_line(err, 160)})") from None
    weights = (state.get(ckpt.EMA) or state.get(ckpt.MODEL)) if isinstance(state, dict) else None
    if not (isinstance(weights, dict) and weights and all(isinstance(t, torch.Tensor) for t in weights.values())):
        raise ModelError(f"MODEL {path}: not a nin-train checkpoint (no {ckpt.MODEL!r} state_dict of tensors)")
    run_id, step = state.get(ckpt.MLFLOW_RUN_ID), state.get(ckpt.STEP)
    config = path.parent.parent / CONFIG_FILE  # RUN/checkpoints/last.pt -> RUN/config.yaml
    source = ModelSource(str(path), "checkpoint", run_id=run_id if isinstance(run_id, str) else None,
                         step=step if isinstance(step, int) else None)
    return OpenedModel(source, config if config.is_file() else None, state=weights)


# --------------------------------------------------------------------------- MLflow models

def _open_mlflow(uri: str, tracking_uri: str, folder: Path) -> OpenedModel:
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per download, on stderr
    mlflow.set_tracking_uri(tracking_uri)  # load_model resolves models:/ and runs:/ there
    client = MlflowClient(tracking_uri)
    try:
        source = _describe(client, uri)
        config = _download_config(client, source, folder)
        loaded = mlflow.pytorch.load_model(_network_uri(client, source))
    except MlflowException as err:  # unknown name, alias, version, id or run; a model MLflow refuses
        raise ModelError(f"MODEL {uri}: {first_line(err.message, 240)}") from None
    if isinstance(loaded, torch.fx.GraphModule):
        loaded = ExportedModel(loaded)
    if not isinstance(loaded, nn.Module):
        raise ModelError(f"MODEL {uri}: not a PyTorch module (MLflow loaded a {type(loaded).__name__})")
    log.info("model: %s (LoggedModel %s of run %s)", uri, source.model_id or "unknown", source.run_id or "unknown")
    return OpenedModel(source, config, loaded=loaded.cpu())


def _describe(client, uri: str) -> ModelSource:
    """The LoggedModel and run behind an MLflow model URI, looked up as MLflow resolves it."""
    from mlflow.exceptions import MlflowException

    if uri.startswith("runs:/"):
        run_id, _, name = uri[len("runs:/"):].partition("/")
        if not run_id or not name:
            raise ModelError(f"MODEL {uri}: expected runs:/<run_id>/{LOGGED_MODEL_NAME}")
        run = client.get_run(run_id)
        outputs = sorted(run.outputs.model_outputs if run.outputs else [], key=lambda o: o.step)
        named = [o.model_id for o in outputs if client.get_logged_model(o.model_id).name == name.strip("/")]
        return _logged(client, uri, named[-1]) if named else ModelSource(uri, "mlflow", run_id=run_id,
                                                                         experiment_id=run.info.experiment_id)
    rest = uri[len("models:/"):].strip("/")
    if _LOGGED_MODEL_ID.match(rest):
        return _logged(client, uri, rest)
    if "@" in rest:
        name, _, alias = rest.partition("@")
        version = client.get_model_version_by_alias(name, alias)
    else:
        name, _, number = rest.rpartition("/")
        if not name or not number.isdigit():
            raise ModelError(f"MODEL {uri}: expected models:/m-<id>, models:/NAME@ALIAS or models:/NAME/VERSION")
        version = client.get_model_version(name, number)
    # A version registered from a LoggedModel names it in model_id, or (older clients) only in its source.
    model_id = version.model_id or (version.source[len("models:/"):] if _LOGGED_MODEL_ID.match(
        (version.source or "")[len("models:/"):]) and version.source.startswith("models:/") else None)
    if model_id:
        try:
            return _logged(client, uri, model_id)
        except MlflowException:  # a version whose LoggedModel lives in another store
            pass
    return ModelSource(uri, "mlflow", run_id=version.run_id)


def _network_uri(client, source: ModelSource) -> str:
    """The URI of the plain network logged beside the model `source` names (the newest READY one of its
    run at its step), or `source.uri` itself when it names a network or none is found."""
    from mlflow.entities import LoggedModelStatus

    if source.model_id is None or source.run_id is None:
        return source.uri
    if client.get_logged_model(source.model_id).name == NETWORK_MODEL_NAME:
        return source.uri
    run = client.get_run(source.run_id)
    steps = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    if source.model_id not in steps:
        return source.uri
    beside = [client.get_logged_model(model_id) for model_id, step in steps.items()
              if step == steps[source.model_id] and model_id != source.model_id]
    networks = [m for m in beside if m.name == NETWORK_MODEL_NAME and m.status == LoggedModelStatus.READY]
    return f"models:/{max(networks, key=lambda m: m.creation_timestamp).model_id}" if networks else source.uri


def _logged(client, uri: str, model_id: str) -> ModelSource:
    model = client.get_logged_model(model_id)
    return ModelSource(uri, "mlflow", model_id=model.model_id, run_id=model.source_run_id,
                       experiment_id=model.experiment_id)


def _download_config(client, source: ModelSource, folder: Path) -> Path | None:
    """The source run's config.yaml, downloaded into `folder`; None when there is none."""
    from mlflow.exceptions import MlflowException

    if source.run_id is None:
        return None
    try:
        return Path(client.download_artifacts(source.run_id, CONFIG_FILE, str(folder)))
    except (MlflowException, OSError) as err:
        log.warning("model: run %s has no %s artifact (%s)", source.run_id, CONFIG_FILE, first_line(err, 160))
        return None
