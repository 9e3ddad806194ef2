"""Copy folders to and from S3 (`AWS_ENDPOINT_URL` selects MinIO or SeaweedFS instead of AWS)."""

from __future__ import annotations

from pathlib import Path

from clipflow.data.storage import s3_client, split_s3
from clipflow.errors import ClipflowError


def _folder(uri: str) -> tuple[str, str]:
    bucket, prefix = split_s3(uri)
    return bucket, prefix.rstrip("/")


def download(uri: str, dest: str | Path) -> int:
    """Copy every object under `uri` into `dest`, keeping relative paths; returns the file count.

    Raises:
        ClipflowError: nothing is stored under `uri`.
    """
    bucket, prefix = _folder(uri)
    s3 = s3_client()
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
    bucket, prefix = _folder(uri)
    s3 = s3_client()
    files = [path for path in sorted(Path(src).rglob("*")) if path.is_file()]
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(src).as_posix()}")
    return len(files)
