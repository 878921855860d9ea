"""Where the store lives: a local directory, or an S3-compatible bucket (``s3://bucket/prefix``).

Both go through pyarrow's filesystems. A bucket is configured the AWS way: credentials
from the default chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a web identity,
an instance profile), ``AWS_REGION``; an S3-compatible server (MinIO, Ceph, R2, ...) by
``COSTWARDEN_STORE_S3_ENDPOINT`` (``http://minio.storage:9000``). An object is written
whole in one PUT, so readers never see half a file, as with the local rename.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

ENDPOINT_ENV = "COSTWARDEN_STORE_S3_ENDPOINT"


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    base: str
    """The store's root inside ``fs`` (a directory, or ``bucket/prefix``), no trailing /."""
    local: bool

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts]) if self.base else "/".join(parts)

    def files(self, *parts: str) -> list[str]:
        """Every ``.parquet`` file under ``parts``, as paths inside ``fs``, sorted."""
        selector = pafs.FileSelector(self.path(*parts), recursive=True, allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(".parquet")
        )

    def relative(self, path: str) -> list[str]:
        """The parts of ``path`` below the store's root."""
        return path[len(self.base) :].strip("/").split("/")


def locate(uri: str | os.PathLike[str]) -> Location:
    text = str(uri)
    if not text.startswith("s3://"):
        return Location(pafs.LocalFileSystem(), str(Path(text).resolve()), True)
    parsed = urlparse(text)
    if not parsed.netloc:
        raise ValueError(f"{text}: name a bucket (s3://bucket/prefix)")
    options: dict[str, object] = {}
    endpoint = os.environ.get(ENDPOINT_ENV, "")
    if endpoint:
        url = urlparse(endpoint)
        options["endpoint_override"] = url.netloc or url.path
        options["scheme"] = url.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    fs = pafs.S3FileSystem(**options)
    base = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
    return Location(fs, base, False)


def is_uri(text: str) -> bool:
    return text.startswith("s3://")
