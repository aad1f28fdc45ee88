"""Opening fsspec URLs (s3://, file://, plain paths) with errors that name the URL.

Credentials and the S3 endpoint are never configured here: s3fs and botocore
read the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or
the pod's role.
"""

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from jcl_k8s.errors import DataError


def url_to_fs(url: str, fresh: bool = False) -> tuple[AbstractFileSystem, str]:
    """The filesystem and path of `url`; `fresh` bypasses fsspec's instance cache.

    A fresh instance is what a forked DataLoader worker needs: s3fs clients must
    not be shared across a fork.
    """
    options: dict[str, Any] = {"skip_instance_cache": True} if fresh else {}
    fs, path = fsspec.core.url_to_fs(url, **options)
    return fs, path


def join(url: str, *parts: str) -> str:
    """`url` with path parts appended by '/', whatever the protocol."""
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                     "ConnectionRefusedError", "ReadTimeoutError"}


@contextmanager
def explained(url: str, what: str) -> Iterator[None]:
    """Turn credential, endpoint and missing-bucket failures on `url` into a
    `DataError` naming it; anything else propagates unchanged."""
    try:
        yield
    except PermissionError as error:
        raise DataError(
            f"{what} {url}: access denied ({error}); check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or the pod's role"
        ) from None
    except Exception as error:
        if type(error).__name__ in CONNECTION_ERRORS:
            raise DataError(f"{what} {url}: cannot reach the endpoint ({error})") from None
        if isinstance(error, FileNotFoundError) and "bucket" in str(error).lower():
            raise DataError(f"{what} {url}: the bucket does not exist") from None
        raise


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with explained(url, "reading"):
        return fs.cat_file(path)


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


def write_bytes(url: str, data: bytes) -> None:
    """Write one object. On object stores no 'directories' are made: s3fs would
    create a missing bucket, and a typo in a bucket name must be an error."""
    fs, path = url_to_fs(url)
    with explained(url, "writing"):
        parent = os.path.dirname(path)
        if parent and is_local(fs):
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    with explained(url, "checking"):
        fs.invalidate_cache()
        return fs.exists(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def as_file(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
