"""Storage access through fsspec: local paths and ``s3://`` (AWS, MinIO, Ceph, moto) alike.

Credentials and the S3 endpoint come only from the environment or the standard AWS config files
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``,
``AWS_DEFAULT_REGION``, ``~/.aws/config``), which botocore resolves itself. Nothing here takes them
as arguments, so they can never end up in a config file, a manifest or a log line.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object becomes
visible only when its (multipart) upload completes, and a failed write aborts the upload.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import uuid
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def get_fs(url: str):
    """(filesystem, path) for a URL or local path.

    fsspec caches filesystem objects by their arguments, and an S3 client reads its endpoint from the
    environment once, when created: so the endpoint is passed explicitly, which makes it part of the
    cache key. Otherwise a process whose AWS_ENDPOINT_URL changes (a test, the demo's local server)
    would keep talking to the old endpoint."""
    endpoint = _s3_endpoint() if url.startswith(("s3://", "s3a://")) else None
    if endpoint:
        return url_to_fs(url, client_kwargs={"endpoint_url": endpoint})
    return url_to_fs(url)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def exists(url: str) -> bool:
    fs, path = get_fs(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = get_fs(url)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    fs, path = get_fs(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def makedirs(url: str) -> None:
    fs, path = get_fs(url)
    if is_local(url):
        fs.makedirs(path, exist_ok=True)
    # object stores have no directories; a bucket must already exist


def remove(url: str) -> None:
    fs, path = get_fs(url)
    if fs.exists(path):
        fs.rm(path)


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator:
    """Open `url` for binary writing so that it appears whole or not at all."""
    fs, path = get_fs(url)
    if is_local(url):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    f = fs.open(path, "wb")
    try:
        yield f
    except BaseException:
        # fsspec's close() would commit the partial object: abort the upload instead.
        if hasattr(f, "discard"):
            f.discard()
        raise
    f.close()


class HashingWriter(io.RawIOBase):
    """File-like sink that sha256-hashes and counts what is written (e.g. by tarfile) on its way to `f`."""

    def __init__(self, f):
        self.f, self.hash, self.count = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.hash.update(b)
        self.count += len(b)
        return len(b)

    def tell(self) -> int:
        return self.count


def atomic_write_bytes(url: str, data: bytes) -> None:
    with atomic_open(url) as f:
        f.write(data)


def atomic_write_text(url: str, text: str) -> None:
    atomic_write_bytes(url, text.encode("utf-8"))


_SECRET_RE = re.compile(
    r"(?i)(aws_secret_access_key|aws_access_key_id|aws_session_token|secret|password|token)(\s*[=:]\s*|\"\s*:\s*\")([^\s\"',}]+)"
)


def redact(text: str) -> str:
    """Mask credential values (and the literal values of credential env vars) in `text`."""
    text = _SECRET_RE.sub(lambda m: m.group(1) + m.group(2) + "***", text)
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def open_read(url: str, block_size: int = 8 << 20):
    fs, path = get_fs(url)
    return fs.open(path, "rb", block_size=block_size)


__all__ = [
    "fsspec",
    "get_fs",
    "is_local",
    "join",
    "exists",
    "size",
    "read_bytes",
    "read_text",
    "makedirs",
    "remove",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "redact",
    "open_read",
]
