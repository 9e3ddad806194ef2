"""`clipflow export`: open_clip's own layout that plain open_clip loads, and ONNX graphs that onnxruntime runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from clipflow import model as clip_model
from clipflow.cli import main
from clipflow.errors import ClipflowError
from clipflow.model.export import CHECK_TEXTS, NormalisedTower, check_onnx
from tests.support import REPO
from tests.support.servers import seaweedfs

MODEL = "CLIP-Tiny"
TEXTS = ["a red circle", "two small purple stars at the top left", "a photo of a dog"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("model")
    return clip_model.save_checkpoint(folder, clip_model.create(MODEL).model, MODEL, extra={})


def images(n: int, side: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(n))


def export(checkpoint: Path, to: str | Path, *options: str) -> int:
    return main(
        ["export", "--model", str(checkpoint), "--to", str(to), "--params", str(REPO / "params.yaml"), *options]
    )


PLAIN_OPEN_CLIP = textwrap.dedent(
    """
    import json, sys
    import open_clip, torch
    folder, texts = sys.argv[1], json.loads(sys.argv[2])
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    model.eval()
    tokens = open_clip.get_tokenizer("local-dir:" + folder)(texts)
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = {"text": model.encode_text(tokens, normalize=True).tolist(),
               "image": model.encode_image(pixels, normalize=True).tolist()}
    assert not any(name.startswith("clipflow") for name in sys.modules), "clipflow was imported"
    print(json.dumps(out))
    """
)


def test_open_clip_layout_loads_in_plain_open_clip(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "export"
    assert export(checkpoint, target) == 0
    assert sorted(p.name for p in target.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".clipflow-export")], "staging left behind"

    # A process that never imports clipflow: CLIP-Tiny's config reaches open_clip only through the folder.
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_OPEN_CLIP, str(target), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = clip_model.load(checkpoint)
    assert np.allclose(theirs["text"], ours.encode_text(TEXTS).numpy(), atol=1e-5)
    assert np.allclose(theirs["image"], ours.encode_images(images(4)).numpy(), atol=1e-5)


def test_onnx_graphs_match_pytorch_at_other_batch_sizes(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "onnx"
    assert export(checkpoint, target, "--format", "onnx") == 0
    info = json.loads((target / "onnx.json").read_text())
    ours = clip_model.load(checkpoint)
    assert info["image"]["size"] == [64, 64]
    assert info["text"]["context_length"] == ours.tokenizer.context_length
    assert all(check["min_cosine"] >= 0.9999 for check in info["check"].values()), info["check"]

    image_session = onnxruntime.InferenceSession(str(target / info["image"]["file"]))
    text_session = onnxruntime.InferenceSession(str(target / info["text"]["file"]))
    for n in (1, 7):
        pixels = images(n)
        (got,) = image_session.run(None, {info["image"]["input"]: pixels.numpy()})
        expected = ours.encode_images(pixels).numpy()
        assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
    texts = (TEXTS * 3)[:7]
    tokens = ours.tokenizer(texts).numpy()  # the full context, padded with 0, as onnx.json says
    (got,) = text_session.run(None, {info["text"]["input"]: tokens})
    expected = ours.encode_text(texts).numpy()
    assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)


def test_a_graph_that_differs_from_pytorch_is_refused_with_its_numbers(checkpoint: Path, tmp_path: Path) -> None:
    target = tmp_path / "onnx"
    assert export(checkpoint, target, "--format", "onnx") == 0
    other = clip_model.create(MODEL).model.eval()  # the same shapes, other weights
    ours = clip_model.load(checkpoint)
    tokens = ours.tokenizer(list(CHECK_TEXTS))
    with pytest.raises(
        ClipflowError,
        match=r"text_encoder.onnx differs from PyTorch: worst-row cosine -?[01]\.\d+ .*max abs difference",
    ):
        check_onnx(target / "text_encoder.onnx", NormalisedTower(other, "encode_text").eval(), tokens)


def test_bad_exports_fail_in_one_line_and_write_nothing(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        ((checkpoint, taken), "exists and is not an empty folder"),
        ((checkpoint, tmp_path / "new", "--format", "tflite"), "--format must be one of open_clip, onnx"),
        ((tmp_path / "missing", tmp_path / "new"), "checkpoint not found"),
    ]
    for args, message in cases:
        assert export(*args) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (taken / "notes.txt").read_text() == "mine"


def test_export_to_s3(checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with seaweedfs(tmp_path / "seaweedfs") as s3:
        s3.client().create_bucket(Bucket="models")
        for name, value in s3.env.items():
            monkeypatch.setenv(name, value)
        assert export(checkpoint, "s3://models/tiny/v1") == 0
        listed = s3.client().list_objects_v2(Bucket="models", Prefix="tiny/v1/")["Contents"]
        assert sorted(item["Key"] for item in listed) == [
            "tiny/v1/open_clip_config.json",
            "tiny/v1/open_clip_model.safetensors",
        ]


@pytest.mark.parametrize(
    ("to", "env", "message"),
    [
        ("hf-hub:someone/tiny", {"HF_HUB_OFFLINE": "1"}, "offline mode is enabled"),
        # A hub that does not answer: what a cluster without egress sees.
        ("hf-hub:someone/tiny", {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}, "Connection refused"),
        ("hf-hub:tiny", {}, "does not name a Hugging Face repository as hf-hub:ORG/NAME"),
    ],
)
def test_a_push_to_the_hub_that_cannot_happen_fails_in_one_line(checkpoint: Path, tmp_path: Path, to, env, message):
    # A process of its own: huggingface_hub reads HF_HUB_OFFLINE and HF_ENDPOINT once, when it is imported.
    command = [str(Path(sys.executable).with_name("clipflow")), "export", "--model", str(checkpoint), "--to", to]
    command += ["--params", str(REPO / "params.yaml")]
    done = subprocess.run(command, cwd=tmp_path, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    (err,) = done.stderr.strip().splitlines()
    assert done.returncode == 1 and message in err, done.stderr
    if "Hugging Face repository" not in message:
        assert err.startswith(f"clipflow: error: cannot push to {to}: ") and err.endswith("nothing was uploaded")
    assert not list(tmp_path.iterdir()), "the staged export was left behind"
