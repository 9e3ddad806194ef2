"""Step metrics from the training leader to the MLflow run, each step exactly once.

On a node it launches, `clipflow train` holds the MLflow run: the leader process appends each
logged step to a JSON-lines file (`MetricsFile`) and the launcher forwards the lines to MLflow
(`MetricsRelay`), along with the node's system metrics. The workers then never import MLflow,
whose import and run set-up took 3 s of every run's start here while the other processes
waited. Where no launcher shares the leader's machine (a Kubeflow TrainJob), the leader logs
through `RunMetrics` itself.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from clipflow.errors import ClipflowError

FILE_NAME = "metrics.jsonl"
POLL_SECONDS = 0.5


class RunMetrics:
    """A handle on the MLflow run: step metrics plus system metrics while it is open.

    A step is only logged past the last step MLflow holds for that metric. A restarted worker
    replays the steps after the last checkpoint, some of which the crashed one may already have
    logged; a replayed step computes the same values (the run is deterministic given the
    checkpoint), so nothing is lost and nothing is logged twice.
    """

    def __init__(self, run_id: str):
        import mlflow

        self._mlflow = mlflow
        client = mlflow.MlflowClient()
        run = client.get_run(run_id)
        # start_run refuses a run outside the active experiment, and a resumed run may be in another.
        mlflow.set_experiment(experiment_id=run.info.experiment_id)
        # Reopening a run makes MLflow continue its system metrics at their last step.
        mlflow.start_run(run_id=run_id, log_system_metrics=True)
        self._last = {
            key: max((m.step for m in client.get_metric_history(run_id, key)), default=0) for key in run.data.metrics
        }

    def log(self, step: int, metrics: dict[str, float]) -> None:
        fresh = {key: value for key, value in metrics.items() if step > self._last.get(key, 0)}
        if fresh:
            self._mlflow.log_metrics(fresh, step=step)
            self._last.update(dict.fromkeys(fresh, step))

    def close(self) -> None:
        self._mlflow.end_run()


class MetricsFile:
    """The leader's side: one JSON line per logged step, flushed as it is written."""

    def __init__(self, path: str | Path):
        self._file = Path(path).open("a", encoding="utf-8")  # noqa: SIM115 - open for the whole run, closed by close()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def last_logged(path: str | Path) -> dict[str, float]:
    """The metrics of the last step a `MetricsFile` holds (the final step: the loop always logs it); {} if none."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[-1])["metrics"] if lines else {}


class MetricsRelay:
    """The launcher's side: a thread that forwards the lines of a `MetricsFile` to the run.

    The file is emptied first: the lines of an earlier job in the same folder are not this one's.
    The thread opens the run itself, while the workers start. A line is forwarded once it is
    complete; `close` forwards what is left and ends the run, and raises if MLflow refused it.
    """

    def __init__(self, path: str | Path, run_id: str):
        self._path = Path(path)
        self._path.write_text("")
        self._run_id = run_id
        self._stop = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._relay, name="clipflow-metrics-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise ClipflowError(f"could not log the step metrics to MLflow: {self._error}") from self._error

    def _relay(self) -> None:
        try:
            # MLflow's active run belongs to the thread that started it: this one logs and ends it.
            metrics = RunMetrics(self._run_id)
            try:
                self._follow(metrics)
            finally:
                metrics.close()
        except Exception as exc:  # raised again by close(), in the launcher's thread
            print(f"clipflow train: step metrics stopped reaching MLflow: {exc}", file=sys.stderr, flush=True)
            self._error = exc

    def _follow(self, metrics: RunMetrics) -> None:
        with self._path.open("r", encoding="utf-8") as lines:
            pending = ""
            while True:
                stopping = self._stop.wait(POLL_SECONDS)
                pending += lines.read()
                *complete, pending = pending.split("\n")
                for line in complete:
                    record = json.loads(line)
                    metrics.log(record["step"], record["metrics"])
                if stopping:
                    return
