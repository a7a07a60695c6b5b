"""tracking.register_model: the logged model becomes a version of a registered model, found by alias.

A real nin-train run into a real sqlite store: the version's model, loaded back by alias with
mlflow.pytorch, computes what the run's checkpoint computes. Then the tracker against a real server
that dies before the model is sent: the registration waits in the spool and `--sync-tracking`
makes the version; sending the record again makes no second one.
"""

from __future__ import annotations

import json

import mlflow
import mlflow.pytorch
import pytest
import torch
from helpers import CPU_CONFIG, data_dir, train_in_process
from mlflow import MlflowClient
from mlflow_runs import INFO, TINY, config, step_metrics

from nin_dist import checkpoint
from nin_dist.config import DataConfig, load_config
from nin_dist.data import load_split, to_inputs
from nin_dist.model import NiN, build_model
from nin_dist.sweep.parent import ParentRun
from nin_dist.tracking import make_tracker
from nin_dist.tracking import sync as sync_spool
from nin_dist.tracking.records import apply_record
from nin_dist.tracking.spool import Spool

pytestmark = pytest.mark.slow
SMOKE = ["data.train_limit=256", "data.test_limit=100", "train.epochs=1", "train.batch_size=128", "model.width=0.25",
         "train.progress=false", "train.threads=1", "train.device=cpu", "tracking.system_metrics=false",
         "train.precision=fp32"]


def test_a_run_registers_its_model_and_the_alias_loads_it(tmp_path, sqlite_uri):
    args = ["--config", str(CPU_CONFIG), *SMOKE, f"tracking.uri={sqlite_uri}", "tracking.register_model=nin-reg",
            f"run.out_dir={tmp_path}/run", "run.name=reg"]
    assert train_in_process(args) == 0
    client = MlflowClient(sqlite_uri)
    (version,) = client.search_model_versions("name = 'nin-reg'")
    run = client.get_run(version.run_id)
    assert run.info.run_name == "reg"
    assert version.source == f"models:/{run.outputs.model_outputs[0].model_id}"

    # nin-sweep's alias on the run's version (as for its best trial), then loaded by alias.
    parent = ParentRun(client, version.run_id)
    assert parent.alias_best("nin-reg", version.run_id) == "models:/nin-reg@best"
    mlflow.set_tracking_uri(sqlite_uri)
    loaded = mlflow.pytorch.load_model("models:/nin-reg@best")

    cfg = load_config(CPU_CONFIG, SMOKE)
    net = build_model(cfg.model, torch.device("cpu"))
    net.load_state_dict(checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")[checkpoint.MODEL])
    batch = to_inputs(load_split(data_dir(), "test", limit=8).images, cfg.data)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), net.eval()(batch), rtol=1e-5, atol=1e-5)


def test_registration_waits_out_an_outage_and_is_sent_once(tmp_path, server, splits):
    _, test = splits
    tracker = make_tracker(config(server.uri, "reg-outage", timeout_s=2.0, register_model="nin-outage"), INFO,
                           tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    server.kill()
    try:
        tracker.log_model(NiN(TINY).eval(), to_inputs(test.images[:2], DataConfig(resize=28)))
        tracker.close()
        kept = [json.loads(line)["kind"] for line in Spool(tmp_path).records_path.read_text().splitlines()]
        assert kept[-3:] == ["model", "register", "terminate"], kept
    finally:
        server.start()
    assert sync_spool(tmp_path) == 0
    client = MlflowClient(server.uri)
    (version,) = client.search_model_versions("name = 'nin-outage'")
    assert version.run_id == tracker.run_id
    record = {"kind": "register", "run_id": tracker.run_id, "name": "nin-outage", "model": "model"}
    apply_record(client, record, tmp_path)  # a resend (a crash before the spool noted it sent)
    assert [v.version for v in client.search_model_versions("name = 'nin-outage'")] == [version.version]
