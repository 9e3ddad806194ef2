"""What each change to the default training mix buys: the default DAG per configuration and seed.

    python benchmarks/bench_training_mix.py [--seeds 0 1 2] [--only NAME ...] [--workdir DIR]

Each configuration is `clipflow run` with the default params.yaml and its own `--set`s, once per seed
(`bench_default_run.run_seed`, which sets `data.seed` and `train.seed`). The configurations are a ladder
from the single-object data of the earlier default to today's default, one change at a time, with the
changes that did not help kept in it. One seed moves held-out top-1 by several hundredths: a change is
read as a gain only when it clears the spread of the seeds.

Writes benchmarks/results/bench_training_mix.json: per configuration and reported metric (those of
bench_default_run), the mean over the seeds, every seed's value and the change against the first
configuration. With `--only`, the other configurations keep the runs the file already holds (each run
records its date), so one new rung costs one configuration's runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import date
from pathlib import Path

from bench_default_run import REPORTED, TARGETS, run_seed
from common import write_results

# name -> the overrides of the default params.yaml; the first is the reference of every change.
# Each names the steps it ran and the share of captions that name a lone object's place, so a rung keeps
# its meaning when the default changes.
OLD_CAPTIONS = "data.position_captions=0.4"  # 4 of the 10 single-object caption templates before it was a setting
CONFIGS: dict[str, tuple[str, ...]] = {
    "single objects (the earlier default)": (
        "data.relation_fraction=0",
        "data.count_fraction=0",
        "train.steps=1000",
        OLD_CAPTIONS,
    ),
    "relations 0.25, twins in one batch": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0",
        "train.steps=1000",
        OLD_CAPTIONS,
    ),
    "counts 0.25, twins in one batch": (
        "data.relation_fraction=0",
        "data.count_fraction=0.25",
        "train.steps=1000",
        OLD_CAPTIONS,
    ),
    "relations and counts 0.25 each, twins in one batch": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0.25",
        "train.steps=1000",
        OLD_CAPTIONS,
    ),
    "relations and counts 0.25 each, twins apart": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0.25",
        "train.batch_group=1",
        "train.steps=1000",
        OLD_CAPTIONS,
    ),
    "relations and counts 0.25 each, 2000 steps": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0.25",
        "train.steps=2000",
        OLD_CAPTIONS,
    ),
    # Fixed 2-D sine-cosine patch positions (as MAE's), of unit scale, where CLIP-Tiny's learned ones start
    # at width^-0.5: the trained default keeps little of an object's column in its image features
    # (bench_position_signal.py).
    "relations and counts 0.25 each, 2-D sin-cos patch positions": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0.25",
        "train.steps=1000",
        "train.model=CLIP-Tiny-2D",
        OLD_CAPTIONS,
    ),
    # Captions that name a lone object's place give each tower a use for position on its own, which the
    # relation twins alone do not (bench_position_signal.py). Today's default, 9 in 10, is bench_default_run's.
    "relations and counts 0.25 each, 2000 steps, 6 in 10 captions name the place": (
        "data.relation_fraction=0.25",
        "data.count_fraction=0.25",
        "train.steps=2000",
        "data.position_captions=0.6",
    ),
}
RESULTS = Path(__file__).parent / "results" / "bench_training_mix.json"
DEFAULT_WORKDIR = Path("/tmp/clipflow-training-mix")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), help="run these configurations alone")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args()
    chosen = {name: overrides for name, overrides in CONFIGS.items() if not args.only or name in args.only}
    fresh: dict[str, list[dict]] = {}
    for name, overrides in chosen.items():
        for seed in args.seeds:
            folder = args.workdir / f"config-{list(CONFIGS).index(name)}-seed-{seed}"
            run = run_seed(seed, folder, overrides) | {"date": date.today().isoformat()}
            fresh.setdefault(name, []).append(run)
            print(json.dumps({"config": name, "seed": seed} | {m: run["metrics"][m] for m in TARGETS}), flush=True)
    kept = {}
    if args.only and RESULTS.exists():
        earlier = json.loads(RESULTS.read_text())
        kept = {name: [{"date": earlier["date"]} | run for run in done] for name, done in earlier["runs"].items()}
    runs = {name: fresh.get(name) or kept[name] for name in CONFIGS if name in fresh or name in kept}
    reference = next(iter(runs))
    cases = []
    for name, config_runs in runs.items():
        for metric in REPORTED:
            values = [run["metrics"][metric] for run in config_runs]
            base = statistics.mean(run["metrics"][metric] for run in runs[reference])
            mean = statistics.mean(values)
            cases.append(
                {
                    "case": f"{name}: {metric}",
                    "config": name,
                    "overrides": list(CONFIGS[name]),
                    "metric": metric,
                    "unit": "fraction",
                    "clipflow": round(mean, 4),
                    "per_seed": [round(value, 4) for value in values],
                    "change": round(mean - base, 4),
                    "peer": None,
                    "peer_value": None,
                    "ratio": None,
                }
            )
    command = "python benchmarks/bench_training_mix.py" + (f" --seeds {' '.join(map(str, args.seeds))}")
    command += f" --only {' '.join(repr(name) for name in args.only)}" if args.only else ""
    path = write_results("bench_training_mix", command, cases, runs=runs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
