"""A plain (synchronous) botocore S3 client for the tools: create buckets, upload, delete.

The engine never uses it: the tools set up objects with their own client, so that they
need nothing private from the engine.
"""

from __future__ import annotations

import os
from typing import Any

#: Part size of the multipart uploads (objects above it are uploaded in parts, so that
#: their ETag is a multipart one, as for most large objects in S3).
UPLOAD_PART = 16 << 20


def s3_client(
    endpoint_url: str | None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> Any:
    """A botocore S3 client; credentials from the arguments, else the usual chain."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=botocore.config.Config(signature_version="s3v4"),
    )


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it is already ours."""
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in (
            "BucketAlreadyOwnedByYou",
            "BucketAlreadyExists",
        ):
            raise


def upload_file(
    client: Any, path: str, bucket: str, key: str, part_size: int = UPLOAD_PART
) -> None:
    """Upload ``path``: a multipart upload in ``part_size`` parts (one PUT below that)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= part_size:
            client.put_object(Bucket=bucket, Key=key, Body=f.read())
            return
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        parts = []
        try:
            number = 1
            while chunk := f.read(part_size):
                part = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
                number += 1
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise
