"""open_clip's own trainer, unpatched, reads clipflow's shards as they are."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from clipflow.data.ingest import ingest
from clipflow.model import CONFIG_DIR
from clipflow.params import Params
from tests.support import bad_inputs

BATCH, STEPS = 8, 3


def test_open_clip_train_runs_on_ingested_shards(small_params: Params, tmp_path: Path) -> None:
    rows = []
    for i in range(40):
        (tmp_path / f"{i}.png").write_bytes(bad_inputs.rgb_png((6 * i, 250 - 6 * i, 90), (64 + i, 64)))
        rows.append({"image": f"{i}.png", "caption": f"a picture of colour {i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    data = dataclasses.replace(small_params.data, shard_size=20, workers=0, split_fractions={"train": 1.0})
    out = tmp_path / "data"
    ingest(str(tmp_path / "manifest.csv"), out, data, small_params.validate)
    shards = sorted(json.loads((out / "train" / "sizes.json").read_text()))
    assert len(shards) == 2
    # CLIP-Tiny ships with clipflow, not open_clip: hand it over as a local-dir model.
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((CONFIG_DIR / "CLIP-Tiny.json").read_text())
    (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))

    command = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset"]
    command += ["--train-data", "::".join(str(out / "train" / name) for name in shards)]
    command += ["--train-num-samples", str(BATCH * STEPS), "--batch-size", str(BATCH), "--epochs", "1"]
    command += ["--workers", "1", "--model", f"local-dir:{model}", "--device", "cpu", "--precision", "fp32"]
    command += ["--logs", str(tmp_path / "logs"), "--name", "run", "--report-to", "", "--save-frequency", "1"]
    command += ["--warmup", "1", "--log-every-n-steps", "1", "--seed", "0"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    log = (tmp_path / "logs" / "run" / "out.log").read_text() if (tmp_path / "logs").exists() else ""
    assert done.returncode == 0, (done.stderr[-3000:], log[-2000:])
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([0-9.]+) ", log)]
    assert len(losses) == STEPS and all(0 < loss < 10 for loss in losses), log[-2000:]
    assert (tmp_path / "logs" / "run" / "checkpoints" / "epoch_1.pt").is_file()
