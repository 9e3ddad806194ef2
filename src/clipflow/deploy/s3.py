"""Copy folders to and from S3 (`AWS_ENDPOINT_URL` selects MinIO or SeaweedFS instead of AWS)."""

from __future__ import annotations

from pathlib import Path

from clipflow.errors import ClipflowError


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/prefix` -> (`bucket`, `key/prefix`), without a trailing slash."""
    if not uri.startswith("s3://"):
        raise ClipflowError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    return bucket, prefix.rstrip("/")


def download(uri: str, dest: str | Path) -> int:
    """Copy every object under `uri` into `dest`, keeping relative paths; returns the file count.

    Raises:
        ClipflowError: nothing is stored under `uri`.
    """
    import boto3

    bucket, prefix = split_uri(uri)
    s3 = boto3.client("s3")
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            target = Path(dest) / item["Key"][len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    if not count:
        raise ClipflowError(f"nothing stored under {uri}")
    return count


def upload(src: str | Path, uri: str) -> int:
    """Copy every file under the folder `src` to `uri`; returns the file count."""
    import boto3

    bucket, prefix = split_uri(uri)
    s3 = boto3.client("s3")
    files = [path for path in sorted(Path(src).rglob("*")) if path.is_file()]
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(src).as_posix()}")
    return len(files)
