"""`clipflow submit` against a local stand-in for the Kubeflow Pipelines v2beta1 API."""

import contextlib
import json
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

import yaml

from clipflow.cli import main
from tests.support import REPO
from tests.support.servers import local_http_server


class FakeKfp:
    """Knows no pipeline at first; the run it starts is RUNNING once, then ends in `final_state`."""

    def __init__(self, final_state: str):
        self.final_state = final_state
        self.requests: list[dict] = []
        self.run_reads = 0

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> dict:
        self.requests.append({"method": method, "path": path, "query": query, "auth": headers.get("Authorization")})
        self.requests[-1]["body"] = body
        if path == "/apis/v2beta1/pipelines" and method == "GET":
            return {"pipelines": []}
        if path == "/apis/v2beta1/pipelines/upload":
            return {"pipeline_id": "p-1", "display_name": query["name"][0]}
        if path == "/apis/v2beta1/pipelines/upload_version":
            return {"pipeline_id": "p-1", "pipeline_version_id": "v-7", "display_name": query["name"][0]}
        if path == "/apis/v2beta1/experiments":
            return {"experiments": []} if method == "GET" else {"experiment_id": "e-3", "display_name": "clipflow"}
        if path == "/apis/v2beta1/runs" and method == "POST":
            return {"run_id": "r-42", "state": "PENDING"}
        if path == "/apis/v2beta1/runs/r-42":
            self.run_reads += 1
            return {"run_id": "r-42", "state": "RUNNING" if self.run_reads == 1 else self.final_state}
        return {}

    def calls(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]


@contextlib.contextmanager
def serve(fake: FakeKfp):
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            data = json.dumps(fake.handle(self.command, url.path, parse_qs(url.query), self.headers, body)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    with local_http_server(Handler) as url:
        yield url


def printed_json(stdout: str) -> dict:
    """The JSON that clipflow prints last; kfp.Client prints links to the UI before it."""
    return json.loads(stdout[stdout.rindex("\n{\n") :])


def submit(url: str, *extra: str) -> int:
    return main(["submit", "--host", url, "--image-tag", "3f2a9c1", "--set", "cluster.nodes=4", *extra])


def test_submit_uploads_a_version_named_by_the_tag_and_starts_a_run(monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "t0ken-from-env")
    fake = FakeKfp("SUCCEEDED")
    with serve(fake) as url:
        assert submit(url, "--wait") == 0
    result = printed_json(capsys.readouterr().out)
    assert result == {
        "pipeline_id": "p-1",
        "version_id": "v-7",
        "version": "3f2a9c1",
        "run_id": "r-42",
        "state": "SUCCEEDED",
    }

    (upload,) = fake.calls("POST", "/apis/v2beta1/pipelines/upload")
    (version,) = fake.calls("POST", "/apis/v2beta1/pipelines/upload_version")
    assert upload["query"]["name"] == ["clipflow"]
    assert version["query"]["name"] == ["3f2a9c1"] and version["query"]["pipelineid"] == ["p-1"]
    # the uploaded file is the cluster build: the steps run the images of this tag
    package = version["body"].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n--", 1)[0]
    spec = next(yaml.safe_load_all(package))
    images = {name: e["container"]["image"] for name, e in spec["deploymentSpec"]["executors"].items()}
    # The optional index step embeds on a GPU, in the CUDA image; every other step runs the step image.
    assert images.pop("exec-index-component") == "ghcr.io/clipflow/clipflow-train:3f2a9c1"
    assert set(images.values()) == {"ghcr.io/clipflow/clipflow:3f2a9c1"}

    (run,) = fake.calls("POST", "/apis/v2beta1/runs")
    body = json.loads(run["body"])
    assert body["experiment_id"] == "e-3" and body["display_name"] == "clipflow-3f2a9c1"
    assert body["pipeline_version_reference"] == {"pipeline_id": "p-1", "pipeline_version_id": "v-7"}
    arguments = body["runtime_config"]["parameters"]
    assert arguments["overrides"][0] == "cluster.image_tag=3f2a9c1" and arguments["overrides"][-1] == "cluster.nodes=4"
    assert json.loads(arguments["params"]) == yaml.safe_load((REPO / "params.yaml").read_text())
    assert fake.run_reads == 2, "--wait must poll until the run ends"
    assert {r["auth"] for r in fake.requests if r["path"] != "/apis/v2beta1/healthz"} == {"Bearer t0ken-from-env"}


def test_a_failed_run_fails_submit_with_one_line(capsys):
    fake = FakeKfp("FAILED")
    with serve(fake) as url:
        assert submit(url, "--wait", "--token", "flag-token") == 1
    assert capsys.readouterr().err.strip() == "clipflow: error: run r-42 ended FAILED"
    assert fake.calls("POST", "/apis/v2beta1/runs")


def test_without_wait_submit_returns_once_the_run_started(capsys):
    fake = FakeKfp("SUCCEEDED")
    with serve(fake) as url:
        assert submit(url) == 0
    assert printed_json(capsys.readouterr().out)["state"] == "PENDING"
    assert fake.run_reads == 0
