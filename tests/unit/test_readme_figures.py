"""The README's default-run figures are the committed results of the script that measured them."""

import json
import re
import statistics

from tests.support import REPO

RESULTS = REPO / "benchmarks" / "results" / "bench_default_run.json"
HEADING = "## What the default run gives"
# | words (`metric`) | **mean** | std | low–high | chance | target |, a mean or bound possibly negative
METRIC_ROW = re.compile(
    r"^\| [^|]*\(`(?P<metric>\w+)`\) \| \**(?P<mean>-?[\d.]+)\** \| (?P<std>[\d.]+) "
    r"\| (?P<low>-?[\d.]+)–(?P<high>-?[\d.]+) \| (?P<chance>[\d.]+|-) \| (?P<target>[\d.]+|-)",
    re.MULTILINE,
)
# | `step` | mean seconds | low–high |
TIMING_ROW = re.compile(r"^\| `(?P<step>\w+)` \| (?P<mean>\d+) \| (?P<low>\d+)–(?P<high>\d+) \|", re.MULTILINE)


def _section() -> str:
    readme = (REPO / "README.md").read_text()
    assert HEADING in readme
    return readme.split(HEADING, 1)[1].split("\n## ", 1)[0]


def test_the_readme_default_run_table_is_the_committed_benchmark_result():
    results = json.loads(RESULTS.read_text())
    cases = {case["metric"]: case for case in results["cases"]}
    rows = {match["metric"]: match for match in METRIC_ROW.finditer(_section())}
    assert set(rows) == set(cases), "the README's default-run table and the results file list different metrics"
    for metric, row in rows.items():
        case = cases[metric]
        assert row["mean"] == f"{case['clipflow']:.3f}", metric
        assert row["std"] == f"{case['std']:.3f}", metric
        assert (row["low"], row["high"]) == (f"{case['min']:.3f}", f"{case['max']:.3f}"), metric
        assert row["chance"] == (f"{case['chance']:.3f}" if case["chance"] is not None else "-"), metric
        assert row["target"] == (f"{case['target']:.2f}" if "target" in case else "-"), metric


def test_the_readme_default_run_timings_and_machine_are_the_committed_benchmark_result():
    results = json.loads(RESULTS.read_text())
    section = _section()
    per_step = {step: [run["timings_s"][step] for run in results["runs"]] for step in results["runs"][0]["timings_s"]}
    per_step["wall"] = [run["wall_s"] for run in results["runs"]]
    rows = {match["step"]: match for match in TIMING_ROW.finditer(section)}
    assert set(rows) == set(per_step)
    for step, seconds in per_step.items():
        row = rows[step]
        assert row["mean"] == f"{statistics.mean(seconds):.0f}", step
        assert (row["low"], row["high"]) == (f"{min(seconds):.0f}", f"{max(seconds):.0f}"), step
    assert results["machine"]["cpu"] in section
    assert f"seeds {', '.join(map(str, results['seeds'][:-1]))} and {results['seeds'][-1]}" in section
