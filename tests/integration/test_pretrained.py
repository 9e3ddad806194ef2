"""Starting from a pretrained model, offline: hf-hub: from the Hugging Face cache, local-dir:, a model cache that
`clipflow pull-model` fills and training reads, `train.steps: 0`, and the one-line errors of bad models.

The "pretrained" model is made here (`tests.support.pretrained`); huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE when imported, so whatever reads the hub runs in a subprocess with that environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from clipflow import model as clip_model
from clipflow.data.ingest import ingest
from clipflow.errors import ClipflowError
from clipflow.registry.models import OPEN_CLIP_KEY, load_model
from tests.support import REPO
from tests.support.pretrained import PretrainedModel, make_pretrained
from tests.support.servers import seaweedfs

CLIPFLOW = str(Path(sys.executable).with_name("clipflow"))
TEXTS = ["a red circle", "two small purple stars at the top left", "a photo of a dog"]
# Embeddings of the same weights in another process: equal up to float32 rounding.
SAME = 0.9999
EMBED = textwrap.dedent(
    """
    import json, sys
    import torch
    from clipflow.registry.models import load_model
    clip = load_model(sys.argv[1])
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    print(json.dumps({"name": clip.name, "text": clip.encode_text(json.loads(sys.argv[2])).tolist(),
                      "image": clip.encode_images(pixels).tolist()}))
    """
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> PretrainedModel:
    return make_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, small_params) -> Path:
    """Ingested test-profile data and the checkout's params, where `clipflow` runs as a user runs it."""
    root = tmp_path_factory.mktemp("pretrained_runs")
    ingest("builtin", root / "data", small_params.data)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def _clipflow(folder: Path, env: dict[str, str], verb: str, *args: str) -> subprocess.CompletedProcess:
    command = [CLIPFLOW, verb, "--profile", "test", *args]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def _embeddings(clip: clip_model.ClipModel) -> dict[str, torch.Tensor]:
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    return {"text": clip.encode_text(TEXTS), "image": clip.encode_images(pixels)}


def _min_cosine(ours: dict[str, torch.Tensor], theirs: dict[str, list]) -> float:
    return min(
        torch.nn.functional.cosine_similarity(ours[tower], torch.tensor(theirs[tower]), dim=-1).min().item()
        for tower in ("text", "image")
    )


def _embedded_elsewhere(reference: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", EMBED, reference, json.dumps(TEXTS)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode not in (0, 130), (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("clipflow: error: "), result.stderr[-3000:]
    return lines[-1]


def test_an_hf_hub_reference_loads_offline_from_the_hugging_face_cache(pretrained):
    source = _embeddings(clip_model.load(pretrained.checkpoint))
    loaded = _embedded_elsewhere(pretrained.reference, pretrained.offline_env())
    assert loaded["name"] == "CLIP-Tiny"  # the config it carries is CLIP-Tiny's, so it keeps that name
    assert _min_cosine(source, loaded) > SAME


def test_a_local_dir_reference_loads_the_same_model_with_its_preprocessing(pretrained):
    source = clip_model.load(pretrained.checkpoint)
    loaded = load_model(f"local-dir:{pretrained.local_dir}")
    assert _min_cosine(_embeddings(source), {k: v.tolist() for k, v in _embeddings(loaded).items()}) > SAME
    image = Image.fromarray(torch.randint(0, 256, (41, 97, 3), dtype=torch.uint8).numpy())
    assert torch.equal(loaded.preprocess(image), source.preprocess(image))
    # The folder named as a plain path, as `clipflow export` printed it, is the same model.
    as_path = load_model(pretrained.local_dir)
    assert torch.equal(as_path.encode_text(TEXTS), loaded.encode_text(TEXTS))


def test_a_folder_with_a_config_no_one_ships_is_rebuilt_from_its_checkpoint_in_another_process(pretrained, tmp_path):
    """A model whose config only its folder knows: the checkpoint clipflow saves of it carries that config."""
    folder = tmp_path / "wide"
    folder.mkdir()
    torch.manual_seed(1)
    config = json.loads((pretrained.local_dir / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["layers"] = 2  # a CLIP-Tiny variant no config file describes
    clip_model.register_config("CLIP-Tiny-2-layers", config["model_cfg"])
    from clipflow.model.export import write_open_clip

    variant = clip_model.create("CLIP-Tiny-2-layers")
    write_open_clip(variant, folder)
    loaded = load_model(f"local-dir:{folder}")
    saved = clip_model.save_checkpoint(tmp_path / "saved", loaded.model, loaded.name, {})
    elsewhere = _embedded_elsewhere(str(saved), pretrained.offline_env())
    assert _min_cosine(_embeddings(variant), elsewhere) > SAME


def test_pull_model_fills_a_cache_that_training_reads_without_the_hub(pretrained, workdir, tmp_path):
    cache = tmp_path / "model-cache"
    pulled = _clipflow(workdir, pretrained.offline_env(), "pull-model", pretrained.reference, "--to", str(cache))
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    written = json.loads(pulled.stdout)
    folder = cache / "hf-hub--clipflow-test--clip-tiny"
    assert written["to"] == str(folder) and sorted(written["files"]) == sorted(p.name for p in folder.iterdir())
    assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()

    # A node with an empty Hugging Face cache and no hub: only the model cache can give the weights.
    node = {**pretrained.offline_env(), "HF_HOME": str(tmp_path / "empty-hf-home")}
    settings = [f"train.pretrained={pretrained.reference}", f"train.model_cache={cache}", "train.steps=2"]
    settings += ["train.lr=0.0000001", "train.warmup_steps=0", "train.log_every=1", "train.batch_size=16"]
    args = ["--data", "data", "--output", "from-cache", "--nproc", "1"]
    trained = _clipflow(workdir, node, "train", *args, *[f"--set={s}" for s in settings])
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = json.loads((workdir / "from-cache" / "train.json").read_text())["checkpoint"]
    assert clip_model.read_checkpoint_info(checkpoint)["clipflow"]["step"] == 2
    # Two steps at a learning rate of 1e-7 leave the pretrained model where it was; random weights are far off.
    source = _embeddings(clip_model.load(pretrained.checkpoint))
    after = _embeddings(clip_model.load(checkpoint))
    assert _min_cosine(source, {k: v.tolist() for k, v in after.items()}) > 0.999

    missing = _clipflow(
        workdir, node, "train", *args[:3], "not-cached", "--set", f"train.pretrained={pretrained.reference}"
    )
    line = _error_line(missing)
    assert f"model {pretrained.reference}: it is not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line and "clipflow pull-model" in line

    # A TrainJob's nodes read the model cache: one without the model is refused before the job is created.
    empty = tmp_path / "empty-cache"
    cluster = ["--launcher", "trainjob", "--data-uri", "s3://data/builtin", *args[:2], "--output", "job"]
    refused = _clipflow(
        workdir, node, "train", *cluster, *[f"--set={s}" for s in settings[:1]], f"--set=train.model_cache={empty}"
    )
    line = _error_line(refused)
    assert f"model {pretrained.reference} is not in the model cache {empty}" in line
    assert f"clipflow pull-model {pretrained.reference} --to {empty}" in line


def test_steps_0_registers_the_referenced_model_as_it_is(pretrained, workdir, tmp_path):
    result = _clipflow(
        workdir,
        pretrained.offline_env(),
        "train",
        *["--data", "data", "--output", "as-it-is"],
        *["--set", "train.steps=0", "--set", f"train.pretrained={pretrained.reference}"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run" not in result.stderr and "train from step" not in result.stderr
    report = json.loads((workdir / "as-it-is" / "train.json").read_text())
    assert report["final_loss"] is None
    info = clip_model.read_checkpoint_info(report["checkpoint"])
    assert info["name"] == "CLIP-Tiny" and info["clipflow"]["step"] == 0

    source = _embeddings(clip_model.load(pretrained.checkpoint))
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    try:
        run = mlflow.get_run(report["mlflow_run_id"])
        assert run.data.params["train.steps"] == "0" and run.data.params["train.pretrained"] == pretrained.reference
        assert run.data.tags["mlflow.note.content"].startswith(f"Registers `{pretrained.reference}` as it is")
        logged = Path(mlflow.artifacts.download_artifacts(report["model_uri"], dst_path=str(tmp_path / "logged")))
    finally:
        mlflow.set_tracking_uri(None)
    # The MLflow model carries the checkpoint and the same model in open_clip's layout.
    from_checkpoint = load_model(next(logged.rglob(clip_model.CHECKPOINT_FILE)))
    from_layout = load_model(f"local-dir:{next(logged.rglob(OPEN_CLIP_KEY))}")
    for clip in (from_checkpoint, from_layout):
        assert _min_cosine(source, {k: v.tolist() for k, v in _embeddings(clip).items()}) > SAME


def _corrupt(folder: Path) -> None:
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _mismatched(folder: Path) -> None:
    config_file = folder / "open_clip_config.json"
    config = json.loads(config_file.read_text())
    config["model_cfg"]["embed_dim"] = 96  # the weights project to 128
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown tag", "unknown pretrained tag 'not-a-tag' for model config 'ViT-B-32'; its known tags: "),
        ("not cached offline", "model hf-hub:clipflow-test/not-cached: it is not in the Hugging Face cache "),
        ("tag not cached offline", "model ViT-B-32:laion2b_s34b_b79k: it is not in the Hugging Face cache "),
        ("corrupt safetensors", "cannot be read: not a safetensors file, or truncated or corrupt"),
        ("architecture mismatch", "do not fit its config: Error(s) in loading state_dict"),
    ],
)
def test_a_bad_model_ends_in_one_clear_line(pretrained, tmp_path, case, message):
    reference = {
        "unknown tag": "ViT-B-32:not-a-tag",
        "not cached offline": "hf-hub:clipflow-test/not-cached",
        "tag not cached offline": "ViT-B-32:laion2b_s34b_b79k",
    }.get(case)
    if reference is None:
        folder = tmp_path / "model"
        shutil.copytree(pretrained.local_dir, folder)
        (_corrupt if case == "corrupt safetensors" else _mismatched)(folder)
        reference = f"local-dir:{folder}"
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    result = _clipflow(tmp_path, pretrained.offline_env(), "export", "--model", reference, "--to", "exported")
    line = _error_line(result)
    assert message in line, line
    assert result.stderr.strip() == line  # nothing else: no log lines of the libraries underneath
    if "offline" in case:
        assert str(pretrained.hf_home / "hub") in line and "HF_HUB_OFFLINE=1" in line and "pull-model" in line
    assert not (tmp_path / "exported").exists()


def test_the_mlflow_model_and_the_bento_carry_the_same_open_clip_files(packaged, tmp_path):
    import bentoml

    stored = Path(bentoml.models.get(packaged["result"].bento_model_tag).path) / OPEN_CLIP_KEY
    mlflow.set_tracking_uri(packaged["params"].tracking.uri)
    try:
        champion = f"models:/{packaged['params'].promote.model_name}/{packaged['version']}"
        logged = Path(mlflow.artifacts.download_artifacts(champion, dst_path=str(tmp_path)))
    finally:
        mlflow.set_tracking_uri(None)
    (in_mlflow,) = logged.rglob(OPEN_CLIP_KEY)
    names = sorted(path.name for path in stored.iterdir())
    assert names == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert names == sorted(path.name for path in in_mlflow.iterdir())
    for name in names:
        assert (stored / name).read_bytes() == (in_mlflow / name).read_bytes(), name


def test_an_s3_model_cache_is_filled_by_pull_model_and_read_without_the_hub(pretrained, tmp_path, monkeypatch):
    with seaweedfs(tmp_path / "seaweedfs") as s3:
        s3.client().create_bucket(Bucket="mirror")
        env = {**pretrained.offline_env(), **s3.env}
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        pulled = _clipflow(tmp_path, env, "pull-model", pretrained.reference, "--to", "s3://mirror/models")
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        listed = s3.client().list_objects_v2(Bucket="mirror", Prefix="models/")["Contents"]
        assert sorted(item["Key"] for item in listed) == [
            "models/hf-hub--clipflow-test--clip-tiny/open_clip_config.json",
            "models/hf-hub--clipflow-test--clip-tiny/open_clip_model.safetensors",
        ]
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        # This process never reads the Hugging Face cache: given a model cache, the hub is not asked.
        loaded = load_model(pretrained.reference, cache="s3://mirror/models")
        with pytest.raises(ClipflowError, match="is not in the model cache s3://mirror/other"):
            load_model(pretrained.reference, cache="s3://mirror/other")
    source = _embeddings(clip_model.load(pretrained.checkpoint))
    assert _min_cosine(source, {k: v.tolist() for k, v in _embeddings(loaded).items()}) > SAME
