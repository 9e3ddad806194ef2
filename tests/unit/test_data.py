import dataclasses
import io
import json
import shutil
import tarfile

import pandas as pd
import pytest
import webdataset as wds

from clipflow.artifacts import data_version
from clipflow.data import builtin
from clipflow.data.chunks import ChunkWriter
from clipflow.data.ingest import ingest
from clipflow.data.shards import TAR_BLOCK, ShardIndex, split_shards, tar_members
from clipflow.errors import ClipflowError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, small_params):
    out = tmp_path_factory.mktemp("data") / "builtin"
    return out, ingest("builtin", out, small_params.data)


def test_counts_reconcile_with_params_metadata_and_sizes(dataset, small_params):
    out, summary = dataset
    metadata = pd.read_parquet(out / "metadata.parquet")
    expected = {"train": small_params.data.num_train, "test": small_params.data.num_test}
    expected |= {"heldout": small_params.data.num_heldout, "shift": small_params.data.num_shift}
    expected |= {"probe": small_params.data.num_probe}
    assert summary.counts == expected
    assert len(metadata) == summary.kept == sum(expected.values())
    for split, count in expected.items():
        sizes = json.loads((out / split / "sizes.json").read_text())
        assert sum(sizes.values()) == count
        assert all(name.startswith(f"{split}-") and name.endswith(".tar") for name in sizes)
    assert metadata["key"].is_unique and metadata["sha256"].notna().all()


def test_builtin_report_has_the_schema_of_every_source_and_shards_number_per_split(dataset, small_params):
    out, summary = dataset
    assert summary.input_rows == summary.kept + summary.quarantined
    assert summary.quarantined == 0 and summary.quarantine_reasons == {}
    assert pd.read_parquet(out / "quarantine.parquet").columns.tolist() == ["row", "key", "source", "reason"]
    shards_per_split = -(-small_params.data.num_train // small_params.data.shard_size)
    train = json.loads((out / "train" / "sizes.json").read_text())
    assert sorted(train) == [f"train-{i:06d}.tar" for i in range(shards_per_split)]
    assert sorted(json.loads((out / "test" / "sizes.json").read_text()))[0] == "test-000000.tar"
    assert not (out / ".ingest").exists()
    assert summary.data_version == data_version(out)


def test_an_interrupted_builtin_ingest_resumes_from_its_committed_chunks(dataset, small_params, tmp_path, monkeypatch):
    out, summary = dataset
    write = ChunkWriter.write
    written: list[int] = []

    def write_until_the_third(self, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt  # the run dies with two chunks committed
        written.append(self.chunks)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(ChunkWriter, "write", write_until_the_third)
    with pytest.raises(KeyboardInterrupt):
        ingest("builtin", tmp_path / "data", small_params.data)
    assert not (tmp_path / "data" / "ingest.json").exists()

    written.clear()
    monkeypatch.setattr(ChunkWriter, "write", lambda self, *a, **k: written.append(self.chunks) or write(self, *a, **k))
    rerun = ingest("builtin", tmp_path / "data", small_params.data)
    assert written[0] == 2
    assert rerun.data_version == summary.data_version
    assert pd.read_parquet(tmp_path / "data" / "metadata.parquet").equals(pd.read_parquet(out / "metadata.parquet"))


def test_heldout_compositions_never_reach_train_or_test(dataset, small_params):
    out, _ = dataset
    metadata = pd.read_parquet(out / "metadata.parquet")
    heldout = set(small_params.data.heldout)
    assert not set(metadata[metadata.split != "heldout"].label) & heldout
    assert not set(metadata["second_label"].dropna()) & heldout  # nor as the second object of a two-object scene
    assert set(metadata[metadata.split == "heldout"].label) <= heldout
    # every colour and shape of a held-out composition is still seen in training, apart
    train = metadata[metadata.split == "train"]
    for label in heldout:
        color, shape = label.split()
        assert (train["color"] == color).any() and (train["shape"] == shape).any()


def test_shift_scenes_are_seen_compositions_outlined_textured_or_resized(dataset, small_params):
    out, _ = dataset
    shift = pd.read_parquet(out / "metadata.parquet").query("split == 'shift'")
    assert shift["shift"].value_counts().to_dict() == {
        kind: small_params.data.num_shift // 3 for kind in builtin.SHIFTS
    }
    assert set(shift.label) <= {f"{c} {s}" for c, s in builtin.compositions(small_params.data, "test")}
    textured = shift["shift"] == "texture"
    assert set(shift[textured].background) == set(builtin.TEXTURES) - {"plain"}
    assert set(shift[~textured].background) == {"plain"}

    def coloured_share(sample: builtin.Sample) -> float:
        """The share of the image that is the object: backgrounds and textures are gray, the colours are not."""
        pixels = sample.image.getdata()
        return sum(max(p) - min(p) > 60 for p in pixels) / len(pixels)

    def shares(split: str, kind: str | None = None) -> list[float]:
        samples = builtin.generate(small_params.data, split)
        # white and black objects are gray too
        chosen = [
            s for s in samples if s.facts["color"] not in ("white", "black") and kind in (None, s.facts.get("shift"))
        ]
        return [coloured_share(sample) for sample in chosen]

    test = shares("test")
    sketch, resized = shares("shift", "sketch"), shares("shift", "size")
    assert sum(sketch) / len(sketch) < 0.5 * sum(test) / len(test)  # outlines only
    assert min(resized) < min(test) and max(resized) > max(test)  # smaller and larger than any test scene


def test_probe_scenes_have_one_true_caption_and_no_answer_bias(dataset):
    out, _ = dataset
    probes = pd.read_parquet(out / "metadata.parquet").query("split == 'probe'")
    assert set(probes["probe"]) == set(builtin.PROBES)
    for row in probes.itertuples():
        candidates = json.loads(row.candidates)
        assert candidates[int(row.answer)] == row.caption and len(set(candidates)) == len(candidates)
    # neither the answer position nor the relation word gives the answer away
    two_way = probes[probes["probe"] != "counting"]
    assert set(two_way["answer"]) == {0, 1}
    spatial = probes[probes["probe"] == "spatial"].caption
    assert spatial.str.contains("left of").any() and spatial.str.contains("right of").any()
    counts = probes[probes["probe"] == "counting"].caption.str.split().str[0]
    assert len(set(counts)) > 1


def test_webdataset_reads_the_shards_as_they_are(dataset):
    out, _ = dataset
    shards = [str(p) for p in split_shards(out, "test")]
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt", "json"))
    assert len(samples) == sum(json.loads((out / "test" / "sizes.json").read_text()).values())
    key, image, caption, meta = samples[0]
    assert image.size == (meta["width"], meta["height"])
    assert meta["color"] in caption and meta["shape"] in caption


def _tarfile_members(path):
    with tarfile.open(path) as tar:
        return [(info.name, info.offset_data, info.size) for info in tar if info.isfile()]


def test_shard_members_are_where_tarfile_finds_them(dataset):
    out, summary = dataset
    shards = split_shards(out, "train")
    members = [member for shard in shards for member in tar_members(shard)]
    assert members == [member for shard in shards for member in _tarfile_members(shard)]
    assert len(members) == 3 * summary.counts["train"]
    with shards[0].open("rb") as file:
        name, offset, size = tar_members(shards[0])[1]
        file.seek(offset)
        assert name.endswith(".txt") and file.read(size).decode().strip()


@pytest.mark.parametrize("layout", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_match_tarfile_for_other_writers(tmp_path, layout):
    path = tmp_path / "other.tar"
    long_name = "/".join(["folder"] * 20) + "/sample.png"  # a ustar prefix, a GNU or a pax long name
    with tarfile.open(path, "w", format=layout, encoding="utf-8") as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, payload in [
            ("folder/a.txt", b"red"),
            (long_name, b"x" * 700),
            ("empty.json", b""),
            ("naïve.txt", b"ok"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "folder/a.txt"
        tar.addfile(link)
    members = tar_members(path)
    assert members == _tarfile_members(path)
    assert [name for name, _, _ in members] == ["folder/a.txt", long_name, "empty.json", "naïve.txt"]


def test_a_damaged_tar_header_is_refused_like_tarfile_does(dataset, tmp_path):
    out, _ = dataset
    damaged = tmp_path / "damaged.tar"
    data = bytearray(split_shards(out, "train")[0].read_bytes())
    data[5] ^= 0xFF  # the first member's name: its checksum no longer matches
    damaged.write_bytes(bytes(data))
    with pytest.raises(tarfile.ReadError):
        _tarfile_members(damaged)
    with pytest.raises(tarfile.ReadError):
        tar_members(damaged)


def test_a_shard_that_lost_samples_to_a_damaged_header_is_refused(dataset, tmp_path):
    out, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(out / "train", copy / "train")
    shard = split_shards(copy, "train")[0]
    data = bytearray(shard.read_bytes())
    _, second_image_offset, _ = tar_members(shard)[3]
    data[second_image_offset - TAR_BLOCK + 5] ^= 0xFF  # the second sample's first header
    shard.write_bytes(bytes(data))
    assert len(_tarfile_members(shard)) == 3  # tarfile stops there without a word
    with pytest.raises(ClipflowError, match=r"holds 1 samples where sizes.json lists \d+: it is damaged"):
        ShardIndex.of_split(copy, "train")


def test_generation_is_deterministic_by_seed(small_params, tmp_path):
    first = ingest("builtin", tmp_path / "a", small_params.data)
    second = ingest("builtin", tmp_path / "b", small_params.data)
    assert first.data_version == second.data_version == data_version(tmp_path / "a")
    sample = next(builtin.generate(small_params.data, "train"))
    assert sample.caption == pd.read_parquet(tmp_path / "a" / "metadata.parquet").caption[0]


def test_unknown_source_is_a_clear_error(small_params, tmp_path):
    with pytest.raises(ClipflowError, match="unsupported source"):
        ingest("ftp://somewhere", tmp_path / "x", small_params.data)


def test_opt_in_scenes_textures_relations_and_counts(small_params):
    params = dataclasses.replace(
        small_params.data,
        num_train=300,
        backgrounds=list(builtin.TEXTURES),
        relation_fraction=0.3,
        count_fraction=0.3,
    )
    samples = list(builtin.generate(params, "train"))
    assert samples == list(builtin.generate(params, "train"))  # deterministic by seed
    facts = pd.DataFrame([s.facts | {"caption": s.caption} for s in samples])
    assert set(facts["background"]) == set(builtin.TEXTURES)
    relations = facts[facts["relation"].notna()]
    counts = facts[facts["count"].notna()]
    assert 60 < len(relations) < 120 and 60 < len(counts) < 120
    assert set(relations["relation"]) == set(builtin.RELATION_WORDS)
    for row in relations.itertuples():
        assert row.label in row.caption and row.second_label in row.caption and row.label != row.second_label
        assert any(word in row.caption for word in builtin.RELATION_WORDS[row.relation])
    assert set(counts["count"]) == {2, 3, 4}
    for row in counts.itertuples():
        assert builtin.NUMBER_WORDS[int(row.count) - 1] in row.caption
    heldout = set(params.heldout)
    assert not (set(facts["label"]) | set(relations["second_label"])) & heldout
    # single-object scenes are the same whatever the fractions: each renders as in the single-object data
    plain = dataclasses.replace(small_params.data, num_train=60, relation_fraction=0.0, count_fraction=0.0)
    mixed = dataclasses.replace(plain, relation_fraction=0.3, count_fraction=0.3)
    singles = [(a, b) for a, b in zip(*(builtin.generate(p, "train") for p in (plain, mixed)), strict=True)]
    singles = [(a, b) for a, b in singles if "relation" not in b.facts and "count" not in b.facts]
    assert 10 < len(singles) < 60
    assert all(a.caption == b.caption and a.image.tobytes() == b.image.tobytes() for a, b in singles)
    assert all(set(a.facts) == {"label", "color", "shape", "size", "position"} for a, _ in singles)


@pytest.mark.parametrize("share", [0.0, 0.6, 1.0])
def test_single_object_captions_name_the_position_at_the_share_asked(small_params, share):
    params = dataclasses.replace(
        small_params.data, num_train=400, relation_fraction=0.0, count_fraction=0.0, position_captions=share
    )
    samples = list(builtin.generate(params, "train")) + list(builtin.generate(params, builtin.SHIFT_SPLIT))
    placed = [s.facts["position"] in s.caption for s in samples]
    assert all(s.facts["color"] in s.caption and s.facts["shape"] in s.caption for s in samples)
    assert abs(sum(placed) / len(placed) - share) < 0.06


def test_two_object_and_counting_scenes_come_in_twins_that_differ_in_one_fact(small_params):
    params = dataclasses.replace(small_params.data, num_train=400, relation_fraction=0.4, count_fraction=0.4)
    samples = list(builtin.generate(params, "train"))
    twists = set()
    for first, second in zip(samples[::2], samples[1::2], strict=True):
        a, b = first.facts, second.facts
        if "relation" in a:
            twists.add(a["twist"])
            assert a["twist"] == b["twist"] and a["background"] == b["background"]
            if a["twist"] == "relation":  # the same objects, turned round
                assert (a["label"], a["second_label"]) == (b["label"], b["second_label"])
                assert builtin.OPPOSITE_RELATIONS[a["relation"]] == b["relation"]
            else:  # the same shapes and places, the colours swapped
                assert a["relation"] == b["relation"] and a["shape"] == b["shape"] and a["color"] != b["color"]
                assert b["second_label"] == f"{a['color']} {a['second_label'].split()[1]}"
        elif "count" in a:
            assert a["label"] == b["label"] and a["count"] != b["count"]
        else:
            assert "count" not in b and "relation" not in b  # single-object scenes pair with single ones
            continue
        assert first.caption != second.caption and first.image.tobytes() != second.image.tobytes()
    assert twists == {"relation", "colours"}


def test_no_training_caption_is_a_probe_candidate(small_params):
    """The probes ask in words training never used: every candidate of every probe kind, for every composition."""
    params = dataclasses.replace(small_params.data, num_train=3000, relation_fraction=0.3, count_fraction=0.3)
    pairs = [f"{color} {shape}" for color, shape in builtin.compositions(params, "test")]
    candidates = {
        f"{word} {color} {builtin.plural(shape) if n else shape}"
        for color, shape in builtin.compositions(params, "test")
        for n, word in enumerate(builtin.NUMBER_WORDS)
    }
    for first in pairs:
        for second in pairs:
            candidates |= {f"a {first} to the {side} of a {second}" for side in ("left", "right")}
            candidates.add(f"a {first} and a {second}")
    probes = {c for sample in builtin.generate(params, builtin.PROBE_SPLIT) for c in sample.facts["candidates"]}
    assert probes <= candidates  # the forms above are the probes' own
    captions = [sample.caption for sample in builtin.generate(params, "train")]
    assert any(" left of " in c for c in captions) and any("three" in c for c in captions)
    assert not set(captions) & candidates


def test_unknown_texture_is_a_clear_error(small_params, tmp_path):
    params = dataclasses.replace(small_params.data, backgrounds=["plaid"])
    with pytest.raises(ClipflowError, match="data.backgrounds must name textures"):
        ingest("builtin", tmp_path / "x", params)
