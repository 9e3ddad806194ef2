import mlflow
import pytest

from clipflow import model as clip_model
from clipflow import tracking
from clipflow.params import TrackingParams
from clipflow.registry.models import download_checkpoint, log_clip_model
from clipflow.registry.promote import gate, promote


def test_gate_floors_and_allowed_drop():
    floors = {"acc": 0.5}
    assert gate({"acc": 0.6}, floors, 0.02, None).passed
    below = gate({"acc": 0.4}, floors, 0.02, None)
    assert not below.passed and "below its floor" in below.reason
    assert gate({"acc": 0.59}, floors, 0.02, {"acc": 0.6}).passed
    dropped = gate({"acc": 0.55}, floors, 0.02, {"acc": 0.6})
    assert not dropped.passed and "drops more than 0.02" in dropped.reason
    assert not gate({}, floors, 0.02, None).passed


@pytest.fixture()
def registry(tmp_path, small_params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = small_params.__class__(
        **{**small_params.__dict__, "tracking": TrackingParams(uri="sqlite:///mlflow.db", experiment="promote-test")}
    )
    tracking.setup(params.tracking)
    checkpoint = clip_model.save_checkpoint(tmp_path / "model", clip_model.create("CLIP-Tiny").model, "CLIP-Tiny", {})
    yield params, checkpoint
    mlflow.set_tracking_uri(None)


def _log(checkpoint):
    with mlflow.start_run():
        return log_clip_model(checkpoint)


def test_register_promote_and_refuse_a_worse_model(registry):
    params, checkpoint = registry
    params = params.__class__(
        **{**params.__dict__, "promote": params.promote.__class__("clip-test", {"zeroshot_top1_heldout": 0.3}, 0.05)}
    )
    first = promote(_log(checkpoint), {"zeroshot_top1_heldout": 0.5}, params, data_version="v1")
    assert first["promoted"] and first["aliases"] == ["challenger", "champion"]

    worse = promote(_log(checkpoint), {"zeroshot_top1_heldout": 0.4}, params)
    assert not worse["promoted"] and worse["aliases"] == ["challenger"]
    assert "drops more than" in worse["reason"]

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("clip-test", "champion")
    assert str(champion.version) == first["model_version"]
    assert champion.tags["data_version"] == "v1"
    assert client.get_model_version("clip-test", worse["model_version"]).tags["promotion"] == "rejected"

    better = promote(_log(checkpoint), {"zeroshot_top1_heldout": 0.46}, params)
    assert better["promoted"]
    restored = clip_model.load(download_checkpoint("models:/clip-test@champion"))
    assert restored.name == "CLIP-Tiny"
