"""A model in the formats other tools load: open_clip's own folder, and ONNX for other runtimes.

`open_clip`: `open_clip_config.json` (`model_cfg` and `preprocess_cfg`, as open_clip's
`save_config_for_hf` writes it) and `open_clip_model.safetensors`, so plain open_clip loads the
folder with `open_clip.create_model_and_transforms("local-dir:FOLDER")`, and no pickle is read.
Pushed to a Hugging Face repository (`hf-hub:ORG/NAME`), the same files load with `hf-hub:ORG/NAME`.

`onnx`: `image_encoder.onnx` (`pixel_values`, float32 (N, 3, H, W), preprocessed as
`onnx.json` says, to `image_embeds`) and `text_encoder.onnx` (`input_ids`, int64 (N, context)
token ids of open_clip's tokenizer, to `text_embeds`), both with a dynamic batch axis and
L2-normalised (N, D) float32 outputs, for users who serve on Triton or ONNX Runtime. The text
tower takes the full context: a runtime has no way to tell the graph a batch's longest prompt.
Before anything is kept, both graphs run in onnxruntime on a fixed batch of another size than the
one they were traced at and are compared with PyTorch; a graph that differs is refused with its
numbers. ONNX is not a clipflow serving backend: on this project's CPUs it measured slower than
PyTorch (see DESIGN.md).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clipflow import storage
from clipflow.errors import ClipflowError
from clipflow.references import HF_HUB_PREFIX, HF_REPO

if TYPE_CHECKING:
    from clipflow.model import ClipModel

FORMATS = ("open_clip", "onnx")
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
ONNX_INFO_FILE = "onnx.json"
ONNX_OPSET = 18
# onnxruntime and PyTorch sum in other orders: fp32 rounding leaves a cosine of 1 - 1e-7 or so. A
# graph that lost a layer or a weight lands far below this.
ONNX_MIN_COSINE = 0.9999
# The check batch differs from the traced one (2), so a graph that fixed its batch size fails here.
CHECK_BATCH = 5
CHECK_TEXTS = ("a photo of a dog", "two small purple stars at the top left", "a red circle", "", "x " * 200)


def export(clip: ClipModel, to: str, fmt: str) -> dict[str, Any]:
    """Write `clip` in format `fmt` to the new folder, the `s3://` prefix or the `hf-hub:ORG/REPO` `to`;
    returns what was written.

    The files are written beside the folder and moved into place whole: a reader never finds a half
    export, and a failed check leaves nothing. A Hugging Face repository receives them in one commit.
    """
    if fmt not in FORMATS:
        raise ClipflowError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    hub_repo = to.removeprefix(HF_HUB_PREFIX) if to.startswith(HF_HUB_PREFIX) else None
    if hub_repo is not None:
        if fmt != "open_clip":
            raise ClipflowError(
                f"{HF_HUB_PREFIX} receives the open_clip format, which open_clip loads from it, not {fmt!r}"
            )
        if not HF_REPO.fullmatch(hub_repo):
            raise ClipflowError(f"{to!r} does not name a Hugging Face repository as hf-hub:ORG/NAME")
    writer = write_open_clip if fmt == "open_clip" else write_onnx
    target = None if storage.is_s3(to) or hub_repo is not None else Path(to).resolve()
    if target is not None:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ClipflowError(f"export target {target} exists and is not an empty folder: choose a new one")
        target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clipflow-export-", dir=None if target is None else target.parent))
    try:
        details = writer(clip.at_precision("fp32"), staging)
        files = sorted(path.name for path in staging.iterdir())
        if hub_repo is not None:
            details["commit"] = push_to_hub(staging, hub_repo, f"clipflow export of {clip.name}")
        elif target is None:
            storage.upload_tree(staging, to)
        else:
            # mkdtemp's folder and safetensors' file are private; an export is for others to read.
            staging.chmod(0o755)
            for path in staging.iterdir():
                path.chmod(0o644)
            if target.exists():
                target.rmdir()
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if fmt == "open_clip" and target is not None:
        details["open_clip_name"] = f"local-dir:{target}"  # what open_clip.create_model_and_transforms takes
    elif hub_repo is not None:
        details["open_clip_name"] = to
    return {"format": fmt, "model": clip.name, "to": str(target or to), "files": files, **details}


def push_to_hub(folder: Path, repo_id: str, message: str) -> str:
    """Upload `folder` to the Hugging Face model repository `repo_id` (created if new) in one commit; returns its URL.

    The token is huggingface_hub's own (HF_TOKEN, or the one `hf auth login` stored), never an argument
    that would show in a process list or a log.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except Exception as exc:  # huggingface_hub's HTTP, auth and offline-mode errors, and the HTTP client's own
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ClipflowError(f"cannot push to {HF_HUB_PREFIX}{repo_id}: {reason}; nothing was uploaded") from None
    return commit.commit_url


def write_open_clip(clip: ClipModel, folder: Path) -> dict[str, Any]:
    """open_clip's layout: the config it reads with `local-dir:` and the weights as safetensors."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    from clipflow.model import model_config

    config = model_config(clip.name)
    if config is None:
        raise ClipflowError(f"no open_clip config {clip.name!r} to write beside the weights")
    save_config_for_hf(clip.model, folder / HF_CONFIG_NAME, model_config=config)
    # safetensors refuses tensors that share memory, which a state dict may hold as views.
    weights = {key: tensor.contiguous().clone() for key, tensor in clip.model.state_dict().items()}
    save_file(weights, folder / HF_SAFE_WEIGHTS_NAME)
    return {}


def write_onnx(clip: ClipModel, folder: Path) -> dict[str, Any]:
    """Both towers as ONNX graphs, checked against PyTorch in onnxruntime, and what runs them."""
    model = clip.model.eval()
    side = model.visual.image_size
    height, width = (side, side) if isinstance(side, int) else side
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    tokens = clip.tokenizer(list(CHECK_TEXTS[:2]))
    image_tower, text_tower = (
        NormalisedTower(model, "encode_image").eval(),
        NormalisedTower(model, "encode_text").eval(),
    )
    _trace(image_tower, images, folder / IMAGE_FILE, "pixel_values", "image_embeds")
    _trace(text_tower, tokens, folder / TEXT_FILE, "input_ids", "text_embeds")
    check_images = torch.randn(CHECK_BATCH, 3, height, width, generator=torch.Generator().manual_seed(1))
    checks = {
        IMAGE_FILE: check_onnx(folder / IMAGE_FILE, image_tower, check_images),
        TEXT_FILE: check_onnx(folder / TEXT_FILE, text_tower, clip.tokenizer(list(CHECK_TEXTS))),
    }
    info = {
        "model": clip.name,
        "opset": ONNX_OPSET,
        "image": {
            "file": IMAGE_FILE,
            "input": "pixel_values",
            "size": [height, width],
            "mean": list(model.visual.image_mean or ()),
            "std": list(model.visual.image_std or ()),
        },
        "text": {
            "file": TEXT_FILE,
            "input": "input_ids",
            "context_length": int(tokens.shape[1]),
            "tokenizer": "open_clip.get_tokenizer(model): ids padded with 0 to the context length",
        },
        "logit_scale": float(model.logit_scale.detach().exp()),
        "check": checks,
    }
    (folder / ONNX_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return {"check": checks}


class NormalisedTower(torch.nn.Module):
    """One encoder of a CLIP model (`encode_image` or `encode_text`) with L2-normalised output, as
    clipflow's embeddings are."""

    def __init__(self, model: torch.nn.Module, encoder: str) -> None:
        super().__init__()
        self.model, self.encoder = model, encoder

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(getattr(self.model, self.encoder)(inputs), dim=-1)


def _trace(tower: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        torch.onnx.export(
            tower,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_shapes={"inputs": {0: batch}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:  # the exporter's failures are many types, each a long trace
        message = " ".join(str(exc).split())[:300]
        raise ClipflowError(f"ONNX export of {path.stem} failed: {message}") from None


def check_onnx(path: Path, tower: torch.nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Run the graph at `path` in onnxruntime on `inputs` and compare it with `tower` in PyTorch.

    Raises:
        ClipflowError: a row's cosine to PyTorch's is below ONNX_MIN_COSINE, or the shapes differ.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (runtime_input,) = session.get_inputs()
    with torch.no_grad():
        expected = tower(inputs)
    try:
        (got,) = session.run(None, {runtime_input.name: inputs.numpy()})
    except Exception as exc:  # onnxruntime's own error types, e.g. a batch size fixed in the graph
        raise ClipflowError(f"{path.name} does not run on a batch of {len(inputs)}: {str(exc)[:300]}") from None
    got = torch.from_numpy(got)
    if got.shape != expected.shape:
        raise ClipflowError(f"{path.name} answers shape {tuple(got.shape)}, PyTorch {tuple(expected.shape)}")
    cosine = float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min())
    max_abs = float((got - expected).abs().max())
    if cosine < ONNX_MIN_COSINE:
        raise ClipflowError(
            f"{path.name} differs from PyTorch: worst-row cosine {cosine:.6f} (at least {ONNX_MIN_COSINE} needed),"
            f" max abs difference {max_abs:.2e}; nothing was exported"
        )
    return {"batch": len(inputs), "min_cosine": round(cosine, 7), "max_abs_diff": max_abs}
