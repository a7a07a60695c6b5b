"""Rank 0's MLflow run: started or resumed at construction, fed by a background sender, ended by close.

Faults. The store must answer at start, or `TrackingError` names the URI. After that no call
raises or waits on the network: each call becomes a record (`nin_dist.tracking.records`) that one
background thread (`nin_dist.tracking.sender`) sends, in call order. When a send fails, that record
and every later one go to `RUN_DIR/tracking-spool/` (`nin_dist.tracking.spool`); the thread asks the
store every `retry_s` whether it is back and then sends the spool first. `close` sends what it can
and says what is left, which `nin-train --sync-tracking RUN_DIR` sends later into the same run, with
the original steps and timestamps. From start to close, one HTTP request waits at most
`tracking.timeout_s` and is not retried (`HttpBounds`, `nin_dist.tracking.store`). Every param,
tag, dataset field and text artifact has its secrets replaced by `***` (`nin_dist.tracking.redaction`),
and so has every MLflow error text this package logs or raises. `close` never raises for want of
disk: what could be neither sent nor kept is named in one error line.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

from nin_dist.errors import TrackingError
from nin_dist.model_source import NETWORK_MODEL_NAME
from nin_dist.tracking.mlflow_internals import system_metrics_monitor
from nin_dist.tracking.redaction import quiet_run_links, redact, redact_error, redact_uri, run_link, secret_values
from nin_dist.tracking.run import open_run
from nin_dist.tracking.saved_model import save_model, save_network, served_scores
from nin_dist.tracking.sender import Sender
from nin_dist.tracking.spool import Spool
from nin_dist.tracking.store import HttpBounds, check_reachable, resolve_uri

log = logging.getLogger(__name__)

RETRY_S = 30.0  # while the store is away: seconds between checks whether it is back
MAX_TEXT_BYTES = 16 << 20  # text artifacts up to this size are scanned for secrets


def _now_ms() -> int:
    return int(time.time() * 1000)


def dataset_fields(split, clean) -> dict:
    """MLflow's dataset fields for a split (`Dataset.to_dict()`): digest of the upstream files,
    source their folder, the profile with the row count and the files; `clean` redacts the text ones."""
    import warnings

    import mlflow.data

    with warnings.catch_warnings():  # a local path is "ambiguous" between two equal source kinds
        warnings.simplefilter("ignore")
        fields = mlflow.data.from_numpy(split.images.cpu().numpy(), source=str(split.files[0].parent),
                                        targets=split.labels.cpu().numpy(), name=split.dataset_name,
                                        digest=split.digest).to_dict()
    profile = json.loads(fields.get("profile") or "{}") | {"num_rows": len(split),
                                                           "files": [str(p) for p in split.files]}
    return {"name": fields["name"], "digest": fields["digest"], "source_type": fields["source_type"],
            "source": clean(fields["source"]), "schema": fields.get("schema"), "profile": clean(json.dumps(profile))}


class MLflowTracker:
    """Rank 0's MLflow run: started (or resumed) here, fed by a background sender, ended by close."""

    def __init__(self, cfg, info, run_dir: Path, resume_run_id: str | None = None,
                 tags: dict[str, str] | None = None, retry_s: float = RETRY_S):
        import mlflow

        tcfg = cfg.tracking
        self._timeout_s = tcfg.timeout_s
        self._log_model_enabled, self._system_metrics = tcfg.log_model, tcfg.system_metrics
        self._register_as = tcfg.register_model  # registered model name, or None
        self._preprocessing = cfg.data, cfg.train.tta  # what the logged model does before and after the network
        self.uri, source = resolve_uri(tcfg.uri)
        self._secrets = secret_values((tcfg.uri, self.uri))
        if self._system_metrics:
            try:
                import psutil  # noqa: F401  (MLflow's system metrics read it)
            except ImportError:
                raise TrackingError("tracking.system_metrics=true needs the psutil package "
                                    "(pip install psutil), or set tracking.system_metrics=false") from None
        quiet_run_links()  # MLflow's own line at the end quotes the URI, password included
        self._http_bounds = HttpBounds(tcfg.timeout_s).open()
        try:
            check_reachable(self.uri, source, tcfg.timeout_s)
            self._spool = Spool(run_dir)
            self._spool.bind(self.uri)
            mlflow.set_tracking_uri(self.uri)
            self._client = mlflow.MlflowClient(self.uri)
            self.run_id = self._open_run(cfg, info, resume_run_id, tags or {})
            self.link = run_link(self.uri, self._client.get_run(self.run_id).info.experiment_id, self.run_id)
        except BaseException:
            self._http_bounds.close()
            raise
        log.info("tracking: MLflow run %s in %s", self.run_id, redact_uri(self.uri))

        self._closed = False
        self._last_step = 0
        self._monitor, self._monitor_lock = None, threading.Lock()
        self._start_monitor(resume=resume_run_id is not None)
        self._sender = Sender(self._client, self.uri, self._spool, tcfg.timeout_s, retry_s, self._secrets,
                              on_reconnect=self._restart_monitor)

    def _open_run(self, cfg, info, resume_run_id: str | None, tags: dict[str, str]) -> str:
        """The run's id (`open_run`); a failure of the store becomes a TrackingError naming it."""
        try:
            return open_run(self._client, cfg, info, resume_run_id, tags, self._clean)
        except TrackingError:
            raise
        except Exception as err:  # MlflowException, or the store's own (SQLAlchemy, OS) errors
            raise TrackingError(f"MLflow tracking store {redact_uri(self.uri)}: could not start the run "
                                f"({redact_error(err, self._secrets)})") from None

    def _clean(self, value) -> str:
        return redact(str(value), self._secrets)

    # ------------------------------------------------------------------ calls: each queues one record

    def _put(self, make_record) -> None:
        """Queue a function that returns the record to send (it runs on the sender thread)."""
        if self._closed:
            log.debug("tracking: call after close ignored")
            return
        self._sender.put(make_record)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        record = {"kind": "metrics", "run_id": self.run_id, "step": int(step), "timestamp": _now_ms(),
                  "metrics": {key: float(value) for key, value in metrics.items()}}
        self._last_step = max(self._last_step, int(step))
        self._put(lambda: record)

    def log_datasets(self, train, test, val=None) -> None:
        """The run's dataset inputs: what it trained on, tested on and (with data.val_size) validated on."""
        contexts = [(train, "training"), (test, "testing")] + ([(val, "validation")] if val is not None else [])
        record = {"kind": "inputs", "run_id": self.run_id,
                  "datasets": [{"dataset": dataset_fields(split, self._clean), "context": context}
                               for split, context in contexts]}
        self._put(lambda: record)

    def log_artifact_file(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a copy of the file as it is now (text with secrets replaced by ***)."""
        path = Path(path)
        if not path.is_file():
            log.warning("tracking: %s is not a file; not logged", path)
            return
        try:
            staged = self._spool.stage(path.name)
            text = None
            if path.stat().st_size <= MAX_TEXT_BYTES:
                try:
                    text = path.read_text(encoding="utf-8")
                except UnicodeDecodeError:
                    pass
            if text is not None:
                staged.write_text(self._clean(text), encoding="utf-8")
            else:
                shutil.copyfile(path, staged)
        except OSError as err:
            log.warning("tracking: %s not logged: cannot copy it into %s (%s)", path, self._spool.folder, err)
            return
        record = {"kind": "artifact", "run_id": self.run_id, "file": self._spool.relative(staged),
                  "artifact_path": artifact_path}
        self._put(lambda: record)

    def log_test_predictions(self, split, predictions) -> None:
        """`predictions/`: confusion matrix (PNG, CSV), per-class accuracy (CSV, JSON), misclassified grid."""
        images, labels = split.images.cpu().numpy(), split.labels.cpu().numpy()
        predicted = predictions.cpu().numpy()

        def render() -> dict:
            from nin_dist.tracking.report import write_report

            folder = self._spool.stage("predictions")
            write_report(folder, images, labels, predicted)
            return {"kind": "artifact", "run_id": self.run_id, "file": self._spool.relative(folder),
                    "artifact_path": "predictions"}

        self._put(render)

    def log_model(self, model, images, test_split=None) -> dict[str, float] | None:
        """The model as the MLflow model named "model" (`nin_dist.tracking.saved_model`: raw images in,
        the run's preprocessing inside) and the plain network as the one named "network" (preprocessed
        floats in, logits out), with `images` (raw uint8 test images) as examples, then a new version
        of `tracking.register_model` (made from "model") when set.
        `model` must run on the CPU as it is (`NiN.portable_copy()`).

        With `test_split`, the saved model, loaded as MLflow serves it, scores that split, and its
        `test/acc` and `test/loss` are logged at the model's step just before the model, which is
        linked to them (the latest value of each metric at its step): what MLflow shows beside the
        model is what the model scores, whatever precision the run evaluated in. Returns those
        scores (None when no model was saved)."""
        if not self._log_model_enabled or self._closed:
            return None
        try:
            path, network = self._spool.stage("model"), self._spool.stage("network")
            save_model(model, images, *self._preprocessing, path)
            save_network(model, images, self._preprocessing[0], network)
            scores = served_scores(path, test_split) if test_split is not None else None
        except Exception:  # the run's result is in the checkpoint; a tracking copy must not fail it
            log.exception("tracking: the model could not be saved for MLflow (the checkpoint holds its weights)")
            return None
        if scores is not None:
            log.info("tracking: the model, as MLflow serves it, scores test loss %.4f acc %.4f (%d images)",
                     scores["test/loss"], scores["test/acc"], len(test_split))
            self.log_metrics(scores, self._last_step)
        record = {"kind": "model", "run_id": self.run_id, "file": self._spool.relative(path), "name": "model",
                  "step": self._last_step}
        self._put(lambda: record)
        network_record = record | {"file": self._spool.relative(network), "name": NETWORK_MODEL_NAME}
        self._put(lambda: network_record)
        if self._register_as:  # after the model record: the version is made from the READY LoggedModel
            register = {"kind": "register", "run_id": self.run_id, "name": self._register_as, "model": "model"}
            self._put(lambda: register)
        return scores

    def close(self, status: str = "FINISHED") -> None:
        """Stop system metrics, end the run with `status`, send or keep everything queued, and lift
        the HTTP bounds."""
        if self._closed:
            return
        end_time = _now_ms()
        self._closed = True
        self._stop_monitor()  # its last samples go before the end
        self._sender.put(lambda: {"kind": "terminate", "run_id": self.run_id, "status": status,
                                  "end_time": end_time})
        try:
            self._sender.finish()
        finally:
            self._http_bounds.close()
        lost = self._sender.lost
        try:
            left, unreadable = self._spool.pending(), None
        except (OSError, TrackingError) as err:  # the spool itself became unreadable
            left, unreadable = 0, err
        if lost:
            log.error("tracking: %d records of MLflow run %s are lost (%s): they could be neither sent to %s "
                      "nor kept in %s (%s)", sum(lost.values()), self.run_id,
                      ", ".join(f"{kind}: {n}" for kind, n in sorted(lost.items())), redact_uri(self.uri),
                      self._spool.folder, self._sender.lost_because)
        elif unreadable is not None:
            log.error("tracking: cannot tell which records of MLflow run %s wait in %s (%s)", self.run_id,
                      self._spool.folder, unreadable)
        elif left:
            log.warning("tracking: %d records of MLflow run %s could not be sent to %s; they wait in %s; "
                        "send them with: nin-train --sync-tracking %s", left, self.run_id,
                        redact_uri(self.uri), self._spool.folder, self._spool.folder.parent)
        else:
            self._spool.remove_if_idle()
        if self.link:
            log.info("tracking: view run %s at %s", self.run_id, self.link)

    # ------------------------------------------------------------------ MLflow's system metrics

    def _start_monitor(self, resume: bool) -> None:
        if not self._system_metrics:
            return
        with self._monitor_lock:
            if self._closed or self._monitor is not None:
                return
            try:
                self._monitor = system_metrics_monitor(self.run_id, resume=resume, tracking_uri=self.uri)
                self._monitor.start()
            except Exception as err:
                log.warning("tracking: system metrics not started (%s)", redact_error(err, self._secrets))
                self._monitor = None

    def _restart_monitor(self) -> None:
        """The store is back: the sampling thread stopped at its first failed request."""
        self._stop_monitor()
        self._start_monitor(resume=True)

    def _stop_monitor(self) -> None:
        with self._monitor_lock:
            monitor, self._monitor = self._monitor, None
        if monitor is not None:
            # finish() joins the sampling thread, which may be in one (bounded) request.
            stopper = threading.Thread(target=monitor.finish, name="mlflow-system-metrics-stop", daemon=True)
            stopper.start()
            stopper.join(timeout=2 * self._timeout_s + 5)
