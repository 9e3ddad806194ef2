"""Typed parameters, built once from params.yaml and passed down.

`params.yaml` is the single source of every knob (it documents each one). This module turns
it into frozen dataclasses, applies a profile and `--set KEY=VALUE` overrides, and rejects
unknown keys and wrong types with one clear message.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipflow.errors import ClipflowError
from clipflow.metric_names import ZEROSHOT_TOP1
from clipflow.prompts import split_template
from clipflow.references import ModelReference, parse_reference

DEFAULT_PARAMS = Path("params.yaml")
# The checkout's params.yaml, shipped inside the package (a link in the checkout, a copy in a wheel): every verb
# works from any folder, and `clipflow init` writes it out to edit.
PACKAGED_PARAMS = Path(__file__).parent / "defaults" / "params.yaml"
PROFILE_ENV = "CLIPFLOW_PROFILE"


# BentoML's rule for the name part of a tag.
BENTO_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")
# Milvus's rule for collection names and aliases.
MILVUS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
# A DNS host name, as the host of a URL spells it (lowercase: URLs' hosts are compared lowercased).
HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*")

# torchrun: on this machine (or each node); trainjob: a Kubeflow Trainer v2 TrainJob on the cluster.
LAUNCHERS = ("torchrun", "trainjob")

# clip: open_clip's ClipLoss; tiled: the same loss in O(tile x batch) memory; siglip: the sigmoid loss, tiled.
TRAIN_LOSSES = ("clip", "tiled", "siglip")

# Where training images are decoded and cropped: cpu (Pillow, in the data-loader workers), gpu (nvJPEG
# on the training device), auto: gpu when training on one (`clipflow.train.data`).
TRAIN_DECODES = ("auto", "cpu", "gpu")

# auto: bf16 on a GPU or a CPU with native bf16 arithmetic, else fp32 (`clipflow.model.precision`).
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class DataParams:
    seed: int
    image_size: int
    num_train: int
    num_test: int
    num_heldout: int
    num_probe: int
    num_shift: int
    shard_size: int
    colors: list[str]
    shapes: list[str]
    heldout: list[str]
    image_column: str
    caption_column: str
    split_fractions: dict[str, float]
    workers: int
    http_timeout_s: float
    http_retries: int
    max_image_bytes: int
    max_manifest_bytes: int
    backgrounds: list[str]
    relation_fraction: float
    count_fraction: float
    position_captions: float

    def check(self) -> None:
        _require_positive("data", self, "num_train", "shard_size", "max_image_bytes", "max_manifest_bytes")
        if self.workers < 0 or self.http_retries < 0 or self.http_timeout_s <= 0:
            raise ClipflowError("data.workers and data.http_retries must not be negative, data.http_timeout_s positive")
        fractions = self.split_fractions
        if not fractions or any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
            raise ClipflowError(f"data.split_fractions must be non-negative and sum to 1; got {fractions}")
        extra = self.relation_fraction + self.count_fraction
        if min(self.relation_fraction, self.count_fraction) < 0 or extra > 1:
            raise ClipflowError(
                "data.relation_fraction and data.count_fraction must be non-negative and sum to at most 1"
            )
        if not 0 <= self.position_captions <= 1:
            raise ClipflowError(f"data.position_captions must be within [0, 1]; got {self.position_captions}")
        known = {f"{c} {s}" for c in self.colors for s in self.shapes}
        unknown = sorted(set(self.heldout) - known)
        if unknown:
            raise ClipflowError(f"data.heldout names compositions outside colors x shapes: {unknown}")


@dataclass(frozen=True)
class ValidateParams:
    caption_min_chars: int
    caption_max_chars: int
    min_side: int
    max_side: int
    max_image_pixels: int
    image_formats: list[str]
    splits: list[str]
    max_bad_fraction: float
    clip_score_model: str | None
    clip_score_min: float | None
    near_duplicate_cosine: float | None

    def check(self) -> None:
        if not 0 <= self.caption_min_chars <= self.caption_max_chars:
            raise ClipflowError(
                f"validate.caption_min_chars ({self.caption_min_chars}) must be between 0 "
                f"and validate.caption_max_chars ({self.caption_max_chars})"
            )
        if not 0 < self.min_side <= self.max_side:
            raise ClipflowError(
                f"validate.min_side ({self.min_side}) must be positive and at most validate.max_side ({self.max_side})"
            )
        if not self.splits:
            raise ClipflowError("validate.splits must name at least one split")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ClipflowError(f"validate.max_bad_fraction must be between 0 and 1, got {self.max_bad_fraction}")
        for name in ("clip_score_min", "near_duplicate_cosine"):
            cosine = getattr(self, name)
            if cosine is None:
                continue
            if not -1.0 <= cosine <= 1.0:  # also false for NaN
                raise ClipflowError(f"validate.{name} must be a cosine in [-1, 1], got {cosine}")
            if self.clip_score_model is None:
                raise ClipflowError(f"validate.{name} needs validate.clip_score_model, the model that embeds the pairs")

    @property
    def curates(self) -> bool:
        """Whether ingest scores pairs or looks for near-duplicates with a model."""
        return self.clip_score_min is not None or self.near_duplicate_cosine is not None


@dataclass(frozen=True)
class TrainParams:
    model: str
    nproc: int
    threads_per_proc: int
    data_workers: int | str  # "auto": from the cores (`clipflow.train.data.data_workers`)
    decode: str
    batch_size: int
    batch_group: int | str  # "auto": 2 on the built-in data, whose scenes come in twins, else 1
    loss: str
    steps: int
    lr: float
    warmup_steps: int
    weight_decay: float
    precision: str
    seed: int
    log_every: int
    accum_freq: int
    grad_checkpointing: bool
    lock_image: bool
    pretrained: str | None
    model_cache: str | None
    checkpoint_every: int
    keep_checkpoints: int
    checkpoint_dir: str | None
    max_restarts: int
    nnodes: int
    node_rank: int
    rdzv_endpoint: str

    def check(self) -> None:
        if self.loss not in TRAIN_LOSSES:
            raise ClipflowError(f"train.loss must be one of {', '.join(TRAIN_LOSSES)}, got {self.loss!r}")
        if self.precision not in PRECISIONS:
            raise ClipflowError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        positive = ("batch_size", "lr", "nproc", "threads_per_proc", "accum_freq", "log_every", "nnodes")
        _require_positive("train", self, *positive, "keep_checkpoints")
        # checkpoint_every 0 writes no resumable checkpoints; a negative warmup would skip the warmup unasked.
        # steps 0 registers the pretrained model as it is.
        if self.decode not in TRAIN_DECODES:
            raise ClipflowError(f"train.decode must be one of {', '.join(TRAIN_DECODES)}, got {self.decode!r}")
        if isinstance(self.data_workers, str) and self.data_workers != "auto":
            raise ClipflowError(f"train.data_workers must be a number or auto, got {self.data_workers!r}")
        if self.data_workers != "auto":
            _require_not_negative("train", self, "data_workers")
        if isinstance(self.batch_group, str) and self.batch_group != "auto":
            raise ClipflowError(f"train.batch_group must be a number or auto, got {self.batch_group!r}")
        if self.batch_group != "auto":
            _require_positive("train", self, "batch_group")
        not_negative = ("steps", "warmup_steps", "weight_decay", "checkpoint_every", "max_restarts")
        _require_not_negative("train", self, *not_negative)
        reference = self.starting_reference()
        if self.steps == 0 and reference is None:
            raise ClipflowError("train.steps: 0 serves a pretrained model as it is: set train.pretrained to one")
        if not 0 <= self.node_rank < self.nnodes:
            raise ClipflowError(f"train.node_rank ({self.node_rank}) must be in [0, train.nnodes)")
        processes = self.nproc * self.nnodes
        check_batch_split(self, processes, f"train.nproc x train.nnodes ({processes})")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit() and 0 < int(port) < 65536):
            raise ClipflowError(f"train.rdzv_endpoint must be HOST:PORT, got {self.rdzv_endpoint!r}")

    def starting_reference(self) -> ModelReference | None:
        """`train.pretrained` parsed (a bare tag belongs to `train.model`), or None for random weights.

        Raises:
            ClipflowError: a malformed reference, named as `train.pretrained`.
        """
        if self.pretrained is None:
            return None
        try:
            # With train.model as the fallback config, a bare name is a tag of it: never a config without weights.
            return parse_reference(self.pretrained, self.model)
        except ClipflowError as exc:
            raise ClipflowError(f"train.pretrained: {exc}") from None


# A zero-shot set's name is part of metric, file and MLflow names (`zeroshot_top1_<set>`, `confusion_<set>.png`).
ZEROSHOT_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class ZeroshotSet:
    """Images of one split, labelled by a metadata column, classified among classes written in words."""

    split: str
    label_field: str
    classes: list[str] = field(default_factory=list)  # empty: every value of `label_field` in the data
    templates: list[str] = field(default_factory=list)  # empty: `evaluate.templates`

    def check(self, name: str) -> None:
        if not ZEROSHOT_SET_NAME.fullmatch(name):
            raise ClipflowError(
                f"evaluate.zeroshot set names must be letters, digits, '_' or '-' (they name metrics), got {name!r}"
            )
        if self.classes and len(set(self.classes)) < 2:
            raise ClipflowError(f"evaluate.zeroshot.{name}.classes must name at least 2 classes, got {self.classes}")


# The built-in data's own zero-shot set, beside `evaluate.zeroshot`: its held-out colour-shape compositions,
# a split no other source has (see `clipflow.data.builtin`).
BUILTIN_ZEROSHOT = {"heldout": ZeroshotSet(split="heldout", label_field="label")}


@dataclass(frozen=True)
class WiseftParams:
    """WiSE-FT: the weights `(1 - a) * pretrained + a * fine-tuned` scored for each `a`, after a fine-tuning."""

    alphas: list[float]  # the mixing weights tried; empty: no interpolation, the fine-tuned weights as they are
    target: str | None  # the zero-shot set to improve (None: the gated set, else the first)
    retention: str | None  # a zero-shot set whose top-1 may not fall below the pretrained's (None: no constraint)
    max_retention_drop: float  # how far below the pretrained's top-1 on `retention` a chosen `a` may fall

    def check(self, sets: dict[str, ZeroshotSet]) -> None:
        """Each `a` a fraction, the named sets among the zero-shot `sets`."""
        outside = [alpha for alpha in self.alphas if not 0.0 <= alpha <= 1.0]  # also true for NaN
        if outside:
            raise ClipflowError(f"evaluate.wiseft.alphas must be fractions in [0, 1], got {outside[0]}")
        if not 0.0 <= self.max_retention_drop <= 1.0:
            raise ClipflowError(
                f"evaluate.wiseft.max_retention_drop must be a fraction in [0, 1], got {self.max_retention_drop}"
            )
        for role in ("target", "retention"):
            name = getattr(self, role)
            if name is not None and name not in sets:
                raise ClipflowError(
                    f"evaluate.wiseft.{role} names no zero-shot set: {name!r} (the sets are {sorted(sets)})"
                )


@dataclass(frozen=True)
class LinearProbeParams:
    """Logistic regression on frozen image features, the reference of the distribution-shift report."""

    max_train: int  # training-split images it is fitted on, evenly spread over the split
    l2: list[float]  # weight penalties tried; the one best on a held-back fifth of those images is refitted on all
    max_iter: int  # L-BFGS iterations per fit

    def check(self) -> None:
        _require_positive("evaluate.linear_probe", self, "max_train", "max_iter")
        if not self.l2 or not all(value >= 0 for value in self.l2):  # also false for NaN
            raise ClipflowError(f"evaluate.linear_probe.l2 must list penalties >= 0, got {self.l2}")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    recall_k: list[int]
    retrieval_split: str
    retrieval_label_field: str | None
    chunk_size: int
    templates: list[str]
    zeroshot: dict[str, ZeroshotSet]
    wiseft: WiseftParams
    linear_probe: LinearProbeParams

    def check(self) -> None:
        _require_positive("evaluate", self, "batch_size", "chunk_size")
        self.linear_probe.check()
        self.wiseft.check(self.zeroshot | BUILTIN_ZEROSHOT)  # whether the data has the set is known after ingest
        if not self.recall_k or min(self.recall_k) < 1:
            raise ClipflowError(f"evaluate.recall_k must list positive ranks, got {self.recall_k}")
        if not self.templates:
            raise ClipflowError("evaluate.templates must hold at least one prompt template")
        for name, spec in self.zeroshot.items():
            spec.check(name)
        # Checked by the rule `classify` serves with, so a bad template fails here and not after training.
        lists = {"evaluate.templates": self.templates}
        lists |= {f"evaluate.zeroshot.{name}.templates": spec.templates for name, spec in self.zeroshot.items()}
        for where, templates in lists.items():
            for template in templates:
                try:
                    split_template(template)
                except ClipflowError as exc:
                    raise ClipflowError(f"{where}: {exc}") from None

    def zeroshot_sets(self, builtin: bool, splits: Collection[str] | None = None) -> dict[str, ZeroshotSet]:
        """The zero-shot sets an evaluation of some data runs: `zeroshot`, then, on the built-in data, its own
        sets whose split it holds (a set of `zeroshot` with the same name takes their place).

        Args:
            builtin: whether the data came from the built-in source (its ingest report says so).
            splits: the splits the data holds; None: every split of the built-in data.
        """
        own = BUILTIN_ZEROSHOT if builtin else {}
        return self.zeroshot | {
            name: spec
            for name, spec in own.items()
            if (splits is None or spec.split in splits) and name not in self.zeroshot
        }


@dataclass(frozen=True)
class PromoteParams:
    model_name: str
    floors: dict[str, float]
    max_drop: float
    min_over_chance: dict[str, float]  # `zeroshot_top1_<set>` -> how far above that set's chance it must be
    bootstrap_samples: int  # resamples of the evaluation items behind each interval of the gate
    confidence: float  # the level of those intervals

    @property
    def gated(self) -> list[str]:
        """The metrics the gate compares with the baseline and the champion: those with a floor or a margin."""
        return sorted(set(self.floors) | set(self.min_over_chance))

    def check(self) -> None:
        """Floors, margins and the drop are fractions, as every metric the gate reads is."""
        for name, floor in self.floors.items():
            if not 0.0 <= floor <= 1.0:  # also false for NaN
                raise ClipflowError(f"promote.floors.{name} must be a fraction in [0, 1], got {floor}")
        for name, margin in self.min_over_chance.items():
            # Chance is known for a zero-shot set's top-1 only: one class in C.
            if not name.startswith(ZEROSHOT_TOP1):
                raise ClipflowError(f"promote.min_over_chance names {ZEROSHOT_TOP1}<set> metrics, got {name!r}")
            if not 0.0 <= margin <= 1.0:
                raise ClipflowError(f"promote.min_over_chance.{name} must be a fraction in [0, 1], got {margin}")
        if not 0.0 <= self.max_drop <= 1.0:
            raise ClipflowError(f"promote.max_drop must be a fraction in [0, 1], got {self.max_drop}")
        _require_positive("promote", self, "bootstrap_samples")
        if not 0.0 < self.confidence < 1.0:
            raise ClipflowError(f"promote.confidence must be a level in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class ServeParams:
    host: str
    port: int
    bento_name: str
    max_labels: int
    max_texts: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_request_pixels: int
    max_request_bytes: int
    max_prompts: int
    max_batch: int
    max_k: int
    gallery_split: str
    thumbnail_px: int
    batching: bool
    batch_max_size: int
    batch_max_latency_ms: int
    max_waiting: int
    tracing: bool
    allow_image_urls: list[str]
    precision: str
    precision_min_cosine: float
    precision_max_top1_drop: float

    def check(self) -> None:
        """Reject what BentoML would refuse only after the model is stored, or with a bare ValueError,
        image URL hosts that are no bare host name, and precision settings no check could pass or fail."""
        if not BENTO_NAME.fullmatch(self.bento_name):
            raise ClipflowError(
                f"serve.bento_name must be lowercase letters, digits, '.', '_' or '-', got {self.bento_name!r}"
            )
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ClipflowError(f"serve.host must be an IP address such as 127.0.0.1, got {self.host!r}") from None
        if not 0 < self.port < 65536:
            raise ClipflowError(f"serve.port must be a TCP port (1 to 65535), got {self.port}")
        numbers = [f.name for f in dataclasses.fields(self) if f.type in ("int", int)]
        _require_positive("serve", self, *numbers)
        if self.max_request_pixels < self.max_image_pixels:  # else an image within its limit could not be sent
            raise ClipflowError(
                f"serve.max_request_pixels ({self.max_request_pixels}) must be at least "
                f"serve.max_image_pixels ({self.max_image_pixels})"
            )
        if self.batch_max_size < 2:  # BentoML refuses a batch of one at import time
            raise ClipflowError(f"serve.batch_max_size must be at least 2, got {self.batch_max_size}")
        for host in self.allow_image_urls:
            if not (HOST_NAME.fullmatch(host) or _is_ip_address(host)):
                raise ClipflowError(
                    f"serve.allow_image_urls lists hosts, such as images.example.com, in lowercase, "
                    f"without scheme, port or path; got {host!r}"
                )
        if self.precision not in PRECISIONS:
            raise ClipflowError(f"serve.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not -1.0 <= self.precision_min_cosine <= 1.0:  # also false for NaN
            raise ClipflowError(
                f"serve.precision_min_cosine must be a cosine in [-1, 1], got {self.precision_min_cosine}"
            )
        if not 0.0 <= self.precision_max_top1_drop <= 1.0:
            raise ClipflowError(
                f"serve.precision_max_top1_drop must be a fraction in [0, 1], got {self.precision_max_top1_drop}"
            )


# Milvus's vector index types clipflow builds: HNSW and IVF_FLAT approximate, FLAT exact.
INDEX_TYPES = ("HNSW", "IVF_FLAT", "FLAT")
# How a Milvus server's URL starts; any other `index.uri` is a Milvus Lite folder.
MILVUS_SERVER_SCHEMES = ("http://", "https://", "tcp://")


@dataclass(frozen=True)
class IndexParams:
    uri: str
    alias: str
    keep_collections: int
    batch_size: int
    workers: int
    threads_per_worker: int
    part_size: int
    split: str | None
    artifact_root: str
    text: bool
    index_type: str
    build_params: dict[str, int]
    search_params: dict[str, int]
    exact_filter_rows: int
    insert_batch: int
    search_batch_max: int

    def check(self) -> None:
        positive = ("batch_size", "workers", "threads_per_worker", "part_size", "insert_batch", "search_batch_max")
        _require_positive("index", self, *positive)
        _require_not_negative("index", self, "keep_collections", "exact_filter_rows")
        if self.index_type not in INDEX_TYPES:
            raise ClipflowError(f"index.index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")
        if not MILVUS_NAME.fullmatch(self.alias):
            raise ClipflowError(
                f"index.alias must start with a letter or '_' and hold only letters, digits and '_', got {self.alias!r}"
            )

    @property
    def is_server(self) -> bool:
        """Whether `uri` names a Milvus server (which several processes share) rather than a Milvus Lite folder."""
        return self.uri.startswith(MILVUS_SERVER_SCHEMES)


@dataclass(frozen=True)
class TrackingParams:
    uri: str
    experiment: str


@dataclass(frozen=True)
class StepResources:
    cpu: str
    memory: str
    retries: int


@dataclass(frozen=True)
class ClusterParams:
    registry: str
    image_tag: str
    tracking_uri: str
    scratch_uri: str
    index_uri: str
    index_root: str
    namespace: str
    s3_secret: str
    mlflow_secret: str
    launcher: str
    runtime: str
    nodes: int
    gpus_per_node: int
    cpu_per_node: str
    memory_per_node: str
    poll_seconds: float
    index_pods: int
    index_gpus_per_pod: int
    resources: dict[str, StepResources]

    def check(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ClipflowError(f"cluster.launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ClipflowError("cluster.nodes must be at least 1 and cluster.gpus_per_node not negative")
        if self.index_pods < 1 or self.index_gpus_per_pod < 0:
            raise ClipflowError("cluster.index_pods must be at least 1 and cluster.index_gpus_per_pod not negative")


@dataclass(frozen=True)
class Params:
    data: DataParams
    validate: ValidateParams
    train: TrainParams
    evaluate: EvaluateParams
    promote: PromoteParams
    serve: ServeParams
    index: IndexParams
    tracking: TrackingParams
    cluster: ClusterParams
    profile: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved values, as the nested mapping params.yaml would hold them."""
        resolved = dataclasses.asdict(self)
        resolved.pop("profile")
        return resolved

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, as MLflow params and `--set` spell them."""
        return {
            f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()
        }

    def gated_set(self, names: Iterable[str], ungated: Iterable[str] | None = None) -> str | None:
        """Of the zero-shot sets `names`, the first whose top-1 the gate reads (a floor or a margin in
        `promote`), else the first of `ungated` (default: `names`); None without sets."""
        names = list(names)
        gated = [name for name in names if f"{ZEROSHOT_TOP1}{name}" in self.promote.gated]
        return (gated or list(names if ungated is None else ungated) or [None])[0]

    def served_prompts(self) -> tuple[str | None, list[str]]:
        """The zero-shot set whose prompt ensemble `classify` serves (`gated_set`), and its templates.

        The built-in data's own sets count when gated: a floor on one of them passes validate on built-in
        data only, so a gated built-in set is one that was evaluated. Ungated, the first set of
        `evaluate.zeroshot`, which every source's evaluation runs.
        """
        sets = self.evaluate.zeroshot_sets(builtin=True)
        name = self.gated_set(sets, ungated=self.evaluate.zeroshot)
        return name, (sets[name].templates if name else []) or self.evaluate.templates

    def procs_per_node(self) -> int:
        """A TrainJob node's training processes: one per GPU, or `train.nproc` on nodes without GPUs."""
        return self.cluster.gpus_per_node or self.train.nproc

    def check(self) -> None:
        """Reject combinations that are well-typed but cannot work, section by section, then across them."""
        checked = (self.data, self.validate, self.train, self.evaluate, self.promote, self.serve, self.index)
        for section in (*checked, self.cluster):
            section.check()
        unknown = sorted(set(self.data.split_fractions) - set(self.validate.splits))
        if unknown:
            raise ClipflowError(f"data.split_fractions names splits outside validate.splits: {unknown}")
        if self.cluster.launcher == "trainjob":
            world = self.cluster.nodes * self.procs_per_node()
            check_batch_split(self.train, world, f"the {world} training processes (cluster.nodes x processes per node)")


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _require_positive(section: str, values: Any, *names: str) -> None:
    for name in names:
        value = _require_finite(section, values, name)
        if value <= 0:
            raise ClipflowError(f"{section}.{name} must be positive, got {value}")


def _require_not_negative(section: str, values: Any, *names: str) -> None:
    for name in names:
        value = _require_finite(section, values, name)
        if value < 0:
            raise ClipflowError(f"{section}.{name} must not be negative, got {value}")


def _require_finite(section: str, values: Any, name: str) -> float:
    value = getattr(values, name)
    if not math.isfinite(value):  # YAML's .nan and .inf are floats too, and NaN fails no comparison
        raise ClipflowError(f"{section}.{name} must be a finite number, got {value}")
    return value


def check_batch_split(train: TrainParams, processes: int, description: str) -> None:
    """The global batch must split evenly over `processes`, and each share over `train.accum_freq`."""
    if train.batch_size % processes:
        raise ClipflowError(f"train.batch_size ({train.batch_size}) must be a multiple of {description}")
    if (train.batch_size // processes) % train.accum_freq:
        raise ClipflowError(
            f"train.accum_freq ({train.accum_freq}) must divide the per-process batch ({train.batch_size // processes})"
        )


_SECTIONS: dict[str, type] = {name: hint for name, hint in typing.get_type_hints(Params).items() if name != "profile"}


def load_params(
    path: str | Path = DEFAULT_PARAMS,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> Params:
    """Read params.yaml, apply a profile and `KEY=VALUE` overrides, and type-check the result.

    Args:
        path: the params file.
        overrides: `section.key=value` strings; values are parsed as YAML.
        profile: a name under `profiles:`; defaults to $CLIPFLOW_PROFILE when set.

    Raises:
        ClipflowError: a missing file, an unknown profile or key, or a value of the wrong type.
    """
    path = params_file(path)
    return parse_params(path.read_text(), overrides, profile, source=str(path))


def params_file(path: str | Path = DEFAULT_PARAMS) -> Path:
    """The params file a verb reads: `path`, or the packaged defaults when `path` is the default and this
    folder has none.

    Raises:
        ClipflowError: `path` names a file that does not exist.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path == DEFAULT_PARAMS:
        return PACKAGED_PARAMS
    raise ClipflowError(f"params file not found: {path}")


def parse_params(
    text: str, overrides: list[str] | None = None, profile: str | None = None, source: str = "params"
) -> Params:
    """`load_params` for the text of a params file (how pipeline components receive it)."""
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ClipflowError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ClipflowError(f"{source} must hold a mapping of sections")

    profiles = raw.pop("profiles", {}) or {}
    profile = profile or os.environ.get(PROFILE_ENV) or None
    settings: list[tuple[str, Any]] = []
    if profile:
        if profile not in profiles:
            raise ClipflowError(f"unknown profile {profile!r}; {source} defines {sorted(profiles)}")
        settings += list(profiles[profile].items())
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep:
            raise ClipflowError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            settings.append((key.strip(), yaml.safe_load(text)))
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ClipflowError(f"--set {key.strip()}: the value {text!r} is not YAML ({problem}); quote it") from None

    for key, value in settings:
        _set(raw, key, value)

    sections = {}
    for section, cls in _SECTIONS.items():
        if section not in raw:
            raise ClipflowError(f"{source} has no {section!r} section")
        sections[section] = _build(section, cls, raw[section])
    params = Params(**sections, profile=profile)
    params.check()
    return params


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key (`evaluate.zeroshot.digits.split`) in the raw sections, led by the dataclasses' fields.

    Under a mapping of free names (a zero-shot set, a floor, a step's resources) a name may be new: a new
    entry starts empty, for its other keys to fill (`_build` then names any that are still missing).

    Raises:
        ClipflowError: a key that names no parameter.
    """
    section, *path = key.split(".")
    if section not in _SECTIONS or not isinstance(raw.get(section), dict) or not path:
        raise ClipflowError(f"unknown parameter {key!r}")
    node, hint = raw[section], _SECTIONS[section]
    for depth, name in enumerate(path):
        if dataclasses.is_dataclass(hint) and name in (fields := typing.get_type_hints(hint)):
            hint = fields[name]
        elif typing.get_origin(hint) is dict and name:
            hint = typing.get_args(hint)[1]
        else:
            raise ClipflowError(f"unknown parameter {key!r}")
        if depth == len(path) - 1:
            node[name] = value
            return
        if node.get(name) is None:
            node[name] = {}
        if not isinstance(node[name], dict):
            raise ClipflowError(
                f"unknown parameter {key!r}: {'.'.join([section, *path[: depth + 1]])} is not a mapping"
            )
        node = node[name]


def _build(section: str, cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = set(values) - set(hints)
    if unknown:
        raise ClipflowError(f"unknown parameter {section}.{sorted(unknown)[0]}")
    optional = {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    optional |= {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    missing = set(hints) - set(values) - optional
    if missing:
        raise ClipflowError(f"missing parameter {section}.{sorted(missing)[0]}")
    return cls(**{name: _coerce(f"{section}.{name}", hints[name], values[name]) for name in hints if name in values})


def _coerce(key: str, expected: Any, value: Any) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ClipflowError(f"{key} must be a mapping, got {value!r}")
        return _build(key, expected, value)
    origin = typing.get_origin(expected)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if not isinstance(value, list):
            raise ClipflowError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", item_type, v) for i, v in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(expected)
        if not isinstance(value, dict):
            raise ClipflowError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(key, key_type, k): _coerce(f"{key}.{k}", value_type, v) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(expected):
            return None
        alternatives = [t for t in typing.get_args(expected) if t is not type(None)]
        # int | str: a number or a word such as "auto"; the section's check says which words.
        matching = [t for t in alternatives if isinstance(value, t) and not (t is int and isinstance(value, bool))]
        expected = matching[0] if matching else alternatives[0]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ClipflowError(f"{key} must be {expected.__name__}, got {value!r}")
    return value
