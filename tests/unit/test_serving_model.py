"""The served model calls: lanes split a batch across threads, or keep it whole, without changing any embedding."""

from __future__ import annotations

import os
import threading

import torch
from PIL import Image

from clipflow import model as clip_model
from clipflow.serve.encoder import Encoder


def test_lanes_give_the_embeddings_of_one_call_in_request_order():
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    texts = ["a red circle", "two blue squares", "a green star", "one purple triangle", "a small red square"]
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "blue", "green", "purple", "white")]
    threads = torch.get_num_threads()
    try:
        one, lanes = Encoder(clip), Encoder(clip, lanes=3)  # 5 items: parts of 2, 2 and 1
        torch.testing.assert_close(lanes.texts(texts), one.texts(texts), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lanes.images(images), one.images(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lanes.texts(texts[:1]), one.texts(texts[:1]), rtol=1e-5, atol=1e-5)
        labels = lanes.labels(["red", "blue"], ["a {}.", "a drawing of a {}."])
        torch.testing.assert_close(labels, clip.encode_labels(["red", "blue"], ["a {}.", "a drawing of a {}."]))
    finally:
        torch.set_num_threads(threads)


def test_one_lane_per_core_the_process_may_use():
    """A container's cpuset narrows the cores: the lanes follow the affinity, not the machine's count."""
    clip = clip_model.create("CLIP-Tiny")
    allowed, threads = os.sched_getaffinity(0), torch.get_num_threads()
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert Encoder.per_core(clip).lanes == 1 and torch.get_num_threads() == 1
        if len(allowed) > 1:
            os.sched_setaffinity(0, set(sorted(allowed)[:2]))
            assert Encoder.per_core(clip).lanes == 2
    finally:
        os.sched_setaffinity(0, allowed)
        torch.set_num_threads(threads)


def test_one_lane_keeps_a_call_whole_in_a_lane_thread():
    clip = clip_model.create("CLIP-Tiny")
    clip.model.eval()
    texts = ["a red circle", "two blue squares", "a green star"]
    calls: list[tuple[str, int]] = []
    encode_text = clip.encode_text

    def recorded(batch: list[str]) -> torch.Tensor:
        calls.append((threading.current_thread().name, len(batch)))
        return encode_text(batch)

    clip.encode_text = recorded
    lanes = Encoder(clip, lanes=3)
    torch.testing.assert_close(lanes.texts(texts, one_lane=True), encode_text(texts), rtol=1e-5, atol=1e-5)
    assert [(name.startswith("clipflow-lane"), size) for name, size in calls] == [(True, 3)]
    calls.clear()
    lanes.texts(texts)
    assert sorted(size for _, size in calls) == [1, 1, 1]
