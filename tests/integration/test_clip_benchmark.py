"""LAION's CLIP_benchmark, run as its users run it, gives `clipflow evaluate`'s numbers on the same checkpoint.

`clipflow train` trains a test-profile model and `clipflow evaluate` scores it; the same images,
captions and labels then go into CLIP_benchmark's `wds/` dataset format (per dataset a `test/`
folder of tar shards with `nshards.txt`, and `classnames.txt` with
`zeroshot_classification_templates.txt`, or `dataset_type.txt` for retrieval), and
`clip_benchmark eval` scores the same checkpoint file through open_clip.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from clipflow.artifacts import METRICS_FILE, TrainReport
from clipflow.data.ingest import ingest
from clipflow.data.shards import ShardIndex
from clipflow.evaluate.report import CLIP_BENCHMARK_DIR
from clipflow.model import CONFIG_DIR, read_checkpoint_info, split_template
from clipflow.params import Params
from tests.support import REPO

TOLERANCE = 0.005
WDS_SPLIT = "test"  # the split folder of each wds dataset (`clip_benchmark eval --split`)
# CLIP_benchmark's console script, after two preparations. CLIP-Tiny ships with clipflow, not open_clip, so
# its config is registered through open_clip's own API (the process never imports clipflow). CLIP_benchmark
# 1.6.2's top-k accuracy converts a 1-element array with float(), an error since NumPy 2.4
# (LAION-AI/CLIP_benchmark#147, open): the fix reported there, its own count taken as a scalar with .item().
LAUNCHER = """
import sys
import open_clip
from clip_benchmark import cli
from clip_benchmark.metrics import zeroshot_classification

def accuracy(output, target, topk=(1,)):
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

open_clip.add_model_config(sys.argv.pop(1))
zeroshot_classification.accuracy = accuracy
cli.main()
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, small_params: Params) -> tuple[Path, Path, dict[str, dict]]:
    """A folder with the ingested data, the checkpoint `clipflow train` wrote, and `clipflow evaluate`'s records."""
    tmp = tmp_path_factory.mktemp("clip_benchmark")
    ingest("builtin", tmp / "data", small_params.data)
    profile = ["--params", str(REPO / "params.yaml"), "--profile", "test"]
    _clipflow(tmp, "train", "--data", "data", "--output", "model", "--nproc", "2", *profile)
    checkpoint = Path(TrainReport.read(tmp / "model").checkpoint)
    _clipflow(tmp, "evaluate", "--model", str(checkpoint), "--data", "data", "--output", "evaluation", *profile)
    records = {path.stem: json.loads(path.read_text()) for path in (tmp / "evaluation" / CLIP_BENCHMARK_DIR).iterdir()}
    return tmp, checkpoint, records


def test_zeroshot_classification_equals_clip_benchmarks(evaluated, small_params: Params) -> None:
    tmp, checkpoint, records = evaluated
    settings = small_params.evaluate
    evaluation = json.loads((tmp / "evaluation" / METRICS_FILE).read_text())
    for name, spec in settings.zeroshot.items():
        classes = evaluation["zeroshot"][name]["classes"]
        index = {label: str(i).encode() for i, label in enumerate(classes)}
        samples = (
            {ext: image, "cls": index[meta[spec.label_field]]}
            for ext, image, _, meta in _pairs(tmp / "data", spec.split)
        )
        templates = [_clip_benchmark_template(t) for t in spec.templates or settings.templates]
        metadata = {"classnames": classes, "zeroshot_classification_templates": templates}
        _write_wds(tmp / "wds" / name, samples, metadata)

    reference = _clip_benchmark(tmp, checkpoint, "zeroshot_classification", list(settings.zeroshot), small_params)
    for name in settings.zeroshot:
        ours = records[f"{name}_zeroshot_classification"]["metrics"]
        assert ours.keys() == reference[name].keys()
        assert ours == pytest.approx(reference[name], abs=TOLERANCE), name


def test_retrieval_recall_at_k_equals_clip_benchmarks(evaluated, small_params: Params) -> None:
    tmp, checkpoint, records = evaluated
    split = small_params.evaluate.retrieval_split
    samples = [{ext: image, "txt": caption} for ext, image, caption, _ in _pairs(tmp / "data", split)]
    # Identical captions are where a count that favours ties disagrees with CLIP_benchmark's: the split must hold some.
    assert len({sample["txt"] for sample in samples}) < len(samples)
    _write_wds(tmp / "wds" / split, samples, {"dataset_type": ["retrieval"]})

    reference = _clip_benchmark(tmp, checkpoint, "zeroshot_retrieval", [split], small_params)[split]
    ours = records[f"{split}_zeroshot_retrieval"]["metrics"]
    assert ours.keys() == reference.keys()
    assert ours == pytest.approx(reference, abs=TOLERANCE)


def _clipflow(cwd: Path, *args: str) -> None:
    command = [str(Path(sys.executable).with_name("clipflow")), *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _pairs(data: Path, split: str) -> Iterator[tuple[str, bytes, bytes, dict]]:
    """(image extension, image bytes, caption bytes, metadata) of a split, in the order clipflow evaluates them."""
    index = ShardIndex.of_split(data, split)
    for i in range(len(index)):
        ext = index.image_ext(i)
        yield ext, index.read(i, ext), index.read(i, "txt"), json.loads(index.read(i, "json"))


def _clip_benchmark_template(template: str) -> str:
    """clipflow's `{}` template as CLIP_benchmark's, which fills it with `str.format(c=classname)`."""
    before, after = (part.replace("{", "{{").replace("}", "}}") for part in split_template(template))
    return before + "{c}" + after


def _write_wds(root: Path, samples: Iterable[dict[str, bytes]], metadata: dict[str, list[str]]) -> None:
    """A wds dataset: one shard of `samples` (extension -> bytes) and a text file per `metadata` entry."""
    (root / WDS_SPLIT).mkdir(parents=True)
    with tarfile.open(root / WDS_SPLIT / "0.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for ext, data in sample.items():
                member = tarfile.TarInfo(f"{i:06d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    (root / WDS_SPLIT / "nshards.txt").write_text("1")
    for name, lines in metadata.items():
        (root / f"{name}.txt").write_text("\n".join(lines))


def _clip_benchmark(root: Path, checkpoint: Path, task: str, datasets: list[str], params: Params) -> dict[str, dict]:
    """`clip_benchmark eval` of the checkpoint on wds datasets under `root/wds`: dataset -> its metrics."""
    out = root / "clip_benchmark" / task
    out.mkdir(parents=True)
    command = [sys.executable, "-c", LAUNCHER, str(CONFIG_DIR), "eval", "--task", task, "--model_type", "open_clip"]
    command += ["--model", read_checkpoint_info(checkpoint)["name"], "--pretrained", str(checkpoint)]
    command += ["--dataset", *(f"wds/{name}" for name in datasets), "--dataset_root", f"{root / 'wds'}/{{dataset}}"]
    command += ["--split", WDS_SPLIT, "--recall_k", *map(str, params.evaluate.recall_k)]
    # clipflow evaluates in fp32 and in batches of evaluate.batch_size; CLIP_benchmark's default is bf16
    # autocast on a CPU. No loader workers: the wds shard is read in order by this one process.
    command += ["--no_amp", "--batch_size", str(params.evaluate.batch_size), "--num_workers", "0"]
    command += ["--output", f"{out}/{{dataset}}.json", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: json.loads((out / f"{name}.json").read_text())["metrics"] for name in datasets}
