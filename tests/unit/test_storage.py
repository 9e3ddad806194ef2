"""The S3 client follows the environment it is asked in."""

from clipflow.storage import s3_client


def _access_key(client) -> str:
    return client._request_signer._credentials.access_key


def test_an_s3_client_is_rebuilt_when_the_credentials_or_the_endpoint_change(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "first-secret")
    first = s3_client()
    assert s3_client() is first and _access_key(first) == "first"

    # Another server on the same address (a port used again) with its own credentials.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "second-secret")
    second = s3_client()
    assert second is not first and _access_key(second) == "second"

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    moved = s3_client()
    assert moved is not second and moved.meta.endpoint_url == "http://127.0.0.1:10"
