import json
import re

import pytest

from clipflow.errors import ClipflowError
from clipflow.params import ZeroshotSet, load_params
from tests.support import REPO

PARAMS = REPO / "params.yaml"


def test_defaults_load_and_profile_overrides_only_its_keys():
    default = load_params(PARAMS)
    small = load_params(PARAMS, profile="test")
    assert small.data.num_train < default.data.num_train
    assert small.train.steps < default.train.steps
    assert small.train.model == default.train.model
    assert small.profile == "test"


def test_set_overrides_parse_values_as_yaml_and_accept_ints_for_floats():
    params = load_params(PARAMS, ["train.lr=1", "data.colors=[red, blue]", "data.heldout=[red star]"])
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.data.colors == ["red", "blue"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.nope=1", "unknown parameter 'train.nope'"),
        ("nope.steps=1", "unknown parameter 'nope.steps'"),
        ("train.steps=many", "train.steps must be int, got 'many'"),
        ("train.steps=true", "train.steps must be int"),
        ("data.colors=red", "data.colors must be a list"),
        ("train.precision=fp8", "train.precision must be one of auto, fp32, bf16, got 'fp8'"),
        ("train.decode=nvjpeg", "train.decode must be one of auto, cpu, gpu, got 'nvjpeg'"),
        ("train.data_workers=many", "train.data_workers must be a number or auto, got 'many'"),
        ("train.data_workers=-1", "train.data_workers must not be negative, got -1"),
        ("train.batch_size=255", "must be a multiple of train.nproc"),
        ("data.heldout=[teal star]", "outside colors x shapes"),
        ("data.split_fractions={train: 0.9}", "data.split_fractions must be non-negative and sum to 1"),
        ("data.split_fractions={train: 0.5, dev: 0.5}", "names splits outside validate.splits: ['dev']"),
        ("data.count_fraction=-0.1", "must be non-negative and sum to at most 1"),
        ("data.position_captions=1.5", "data.position_captions must be within [0, 1]; got 1.5"),
        ("validate.min_side=0", "must be positive and at most validate.max_side"),
        ("serve.max_k=0", "serve.max_k must be positive, got 0"),
        ("serve.batch_max_size=1", "serve.batch_max_size must be at least 2"),
        ("serve.host=localhost", "serve.host must be an IP address"),
        ("serve.bento_name=Clip Flow", "serve.bento_name must be lowercase"),
        ("serve.precision=fp16", "serve.precision must be one of auto, fp32, bf16, got 'fp16'"),
        ("serve.precision_min_cosine=1.5", "serve.precision_min_cosine must be a cosine in [-1, 1], got 1.5"),
        ("serve.precision_min_cosine=.nan", "serve.precision_min_cosine must be a cosine in [-1, 1], got nan"),
        ("serve.precision_max_top1_drop=-0.1", "serve.precision_max_top1_drop must be a fraction in [0, 1], got -0.1"),
        ("cluster.nodes=3", "multiple of the 24 training processes"),
        ("train.steps", "--set expects KEY=VALUE"),
        ("train.nproc=0", "train.nproc must be positive, got 0"),
        ("train.threads_per_proc=0", "train.threads_per_proc must be positive, got 0"),
        ("train.batch_group=0", "train.batch_group must be positive, got 0"),
        ("train.batch_group=twins", "train.batch_group must be a number or auto, got 'twins'"),
        ("train.lr=-1", "train.lr must be positive, got -1.0"),
        ("train.lr=0", "train.lr must be positive, got 0.0"),
        ("train.lr=.nan", "train.lr must be a finite number, got nan"),
        ("train.log_every=0", "train.log_every must be positive, got 0"),
        ("train.warmup_steps=-5", "train.warmup_steps must not be negative, got -5"),
        ("train.weight_decay=-0.1", "train.weight_decay must not be negative, got -0.1"),
        ("train.weight_decay=.inf", "train.weight_decay must be a finite number, got inf"),
        ("train.checkpoint_every=-1", "train.checkpoint_every must not be negative, got -1"),
        ("train.max_restarts=-1", "train.max_restarts must not be negative, got -1"),
        ("evaluate.batch_size=0", "evaluate.batch_size must be positive, got 0"),
        ("evaluate.chunk_size=-1", "evaluate.chunk_size must be positive, got -1"),
        ("evaluate.recall_k=[]", "evaluate.recall_k must list positive ranks, got []"),
        ("evaluate.linear_probe.max_train=0", "evaluate.linear_probe.max_train must be positive, got 0"),
        ("evaluate.linear_probe.l2=[]", "evaluate.linear_probe.l2 must list penalties >= 0, got []"),
        ("evaluate.linear_probe.l2=[0.1, -1]", "evaluate.linear_probe.l2 must list penalties >= 0, got [0.1, -1.0]"),
        ("evaluate.recall_k=[1, 0]", "evaluate.recall_k must list positive ranks, got [1, 0]"),
        ("evaluate.templates=[]", "evaluate.templates must hold at least one prompt template"),
        ('evaluate.templates=["a {:x>40000000}"]', "evaluate.templates: template 'a {:x>40000000}' must contain '{}'"),
        ('evaluate.templates=["a photo"]', "evaluate.templates: template 'a photo' must contain '{}' exactly once"),
        ("index.index_type=ANNOY", "index.index_type must be one of HNSW, IVF_FLAT, FLAT, got 'ANNOY'"),
        ("index.alias=my-alias", "index.alias must start with a letter or '_'"),
        ("index.workers=0", "index.workers must be positive, got 0"),
        ("index.keep_collections=-1", "index.keep_collections must not be negative, got -1"),
        ("validate.clip_score_min=0.2", "validate.clip_score_min needs validate.clip_score_model"),
        ("validate.near_duplicate_cosine=1.5", "validate.near_duplicate_cosine must be a cosine in [-1, 1], got 1.5"),
        ("cluster.index_pods=0", "cluster.index_pods must be at least 1"),
        (
            'evaluate.zeroshot={heldout: {split: heldout, label_field: label, classes: [], templates: ["{0}"]}}',
            "evaluate.zeroshot.heldout.templates: template '{0}' must contain '{}' exactly once",
        ),
        ("evaluate.zeroshot.digits.split=test", "missing parameter evaluate.zeroshot.digits.label_field"),
        ("evaluate.zeroshot.seen.splt=test", "unknown parameter 'evaluate.zeroshot.seen.splt'"),
        ("evaluate.zeroshot.seen.classes=[three]", "evaluate.zeroshot.seen.classes must name at least 2 classes"),
        ("evaluate.zeroshot={my set: {split: test, label_field: label}}", "set names must be letters, digits"),
        ("train.lr.warm=1", "unknown parameter 'train.lr.warm': train.lr is not a mapping"),
        ("promote.floors.retrieval_i2t_r1.x=1", "unknown parameter 'promote.floors.retrieval_i2t_r1.x'"),
        ("promote.floors.zeroshot_top1_digits=2", "promote.floors.zeroshot_top1_digits must be a fraction in [0, 1]"),
        ("cluster.resources.gpu.cpu=1", "missing parameter cluster.resources.gpu.memory"),
        ("evaluate.templates=[a {}.]", "--set evaluate.templates: the value '[a {}.]' is not YAML"),
    ],
)
def test_bad_overrides_are_one_clear_error(override, message):
    with pytest.raises(ClipflowError, match=re.escape(message)):
        load_params(PARAMS, [override])


def test_nested_set_keys_add_a_zeroshot_set_and_a_floor_beside_the_defaults():
    params = load_params(
        PARAMS,
        [
            "evaluate.zeroshot.digits.split=test",
            "evaluate.zeroshot.digits.label_field=digit",
            "evaluate.zeroshot.seen.templates=['a drawing of a {}.']",
            "promote.floors.zeroshot_top1_digits=0.3",
            "index.build_params.M=32",
        ],
        profile="test",
    )
    assert params.evaluate.zeroshot["digits"] == ZeroshotSet(split="test", label_field="digit")
    assert params.evaluate.zeroshot["digits"].classes == [] and params.evaluate.zeroshot["digits"].templates == []
    assert params.evaluate.zeroshot["seen"].templates == ["a drawing of a {}."]
    # the profile's floors stay; the new one joins them
    assert params.promote.floors == {"zeroshot_top1_seen": 0.0, "retrieval_i2t_r1": 0.0, "zeroshot_top1_digits": 0.3}
    assert params.index.build_params == {"M": 32, "efConstruction": 200}


def test_zeroshot_sets_are_named_freely_and_may_be_none():
    assert load_params(PARAMS, ["evaluate.zeroshot={}"]).evaluate.zeroshot == {}
    renamed = load_params(PARAMS, ["evaluate.zeroshot={my-digits_2: {split: test, label_field: label}}"])
    assert list(renamed.evaluate.zeroshot) == ["my-digits_2"]


def test_zero_is_a_valid_warmup_and_checkpoint_interval():
    params = load_params(PARAMS, ["train.warmup_steps=0", "train.checkpoint_every=0", "train.weight_decay=0"])
    assert params.train.warmup_steps == 0 and params.train.checkpoint_every == 0


def test_several_nodes_need_a_rendezvous_host_and_port():
    several = ["train.nnodes=2", "train.batch_size=256"]
    assert load_params(PARAMS, several).train.rdzv_endpoint == "127.0.0.1:29400"
    for endpoint in ("nohost", ":29400", "host:port", "host:70000"):
        with pytest.raises(ClipflowError, match="train.rdzv_endpoint must be HOST:PORT"):
            load_params(PARAMS, [*several, f"train.rdzv_endpoint={endpoint}"])


def test_missing_file_and_unknown_profile():
    with pytest.raises(ClipflowError, match="params file not found"):
        load_params("does-not-exist.yaml")
    with pytest.raises(ClipflowError, match="unknown profile 'huge'"):
        load_params(PARAMS, profile="huge")


def test_flat_keys_round_trip_through_set():
    params = load_params(PARAMS, profile="test")
    # JSON is YAML: null, strings and lists round-trip as the values they are.
    again = load_params(
        PARAMS, [f"{key}={json.dumps(value)}" for key, value in params.flat().items() if key.startswith("train.")]
    )
    assert again.train == params.train


def test_classify_serves_the_prompts_of_the_gated_zeroshot_set():
    default = load_params(PARAMS)
    assert default.served_prompts() == ("seen", default.evaluate.templates)
    digits = [
        "evaluate.zeroshot.digits={split: test, label_field: label, templates: ['a handwritten {}.']}",
        "promote.floors={zeroshot_top1_digits: 0.3}",
    ]
    assert load_params(PARAMS, digits).served_prompts() == ("digits", ["a handwritten {}."])
    # a margin over chance gates a set as a floor does; the built-in data's own set can be the gated one
    margin = load_params(
        PARAMS, [digits[0], "promote.floors={}", "promote.min_over_chance={zeroshot_top1_digits: 0.1}"]
    )
    assert margin.served_prompts()[0] == "digits"
    builtin = load_params(PARAMS, ["promote.floors={zeroshot_top1_heldout: 0.2}"])
    assert builtin.served_prompts() == ("heldout", default.evaluate.templates)
    # ungated: the first set
    assert load_params(PARAMS, [digits[0], "promote.floors={}"]).served_prompts()[0] == "seen"
    assert load_params(PARAMS, ["evaluate.zeroshot={}"]).served_prompts() == (None, default.evaluate.templates)
