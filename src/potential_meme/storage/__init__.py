"""Artifact stores: a local folder (file:// or a plain path) or S3 (s3://bucket/prefix).

Keys are '/'-separated paths relative to the store's root URI. S3 honours the standard AWS
environment (credentials, region) and `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` /
`S3_ENDPOINT_URL` for MinIO-style stores.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import urlparse

PARTIAL = ".partial"  # a file being written; never listed, never read
HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """A file's sha256, read a chunk at a time: checkpoints and students are gigabytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(target: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file of a name no other writer shares, made durable (fsync) before
    it is renamed into place: a reader sees the old file or the whole new one, even after a power cut."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


class ArtifactStore(Protocol):
    uri: str

    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def upload_file(self, local: Path, key: str) -> None: ...
    def download_file(self, key: str, local: Path) -> None: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def delete_prefix(self, prefix: str) -> None: ...


class LocalStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri() + "/"

    def _path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(
            str(path.relative_to(self.root)) for path in base.rglob("*") if path.is_file() and path.suffix != PARTIAL
        )

    def upload_file(self, local: Path, key: str) -> None:
        target = self._path(key)
        if Path(local).resolve() != target.resolve():
            with open(local, "rb") as source:
                _write_atomically(target, lambda handle: shutil.copyfileobj(source, handle, HASH_CHUNK))

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if self._path(key).resolve() != Path(local).resolve():
            shutil.copyfile(self._path(key), local)

    def write_bytes(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), lambda handle: handle.write(data))

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


_clients: dict[tuple[str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def s3_client(endpoint: str | None = None) -> Any:
    """One client per endpoint and identity: making a client costs ~50 ms of CPU, and the operator
    checks stage manifests on every reconciliation. Clients are thread-safe; creating them is not.

    Timeouts are bounded so an unreachable store fails a call in seconds instead of hanging the
    operator's reconciliation or a trainer's checkpoint; botocore retries throttling and 5xx itself.
    """
    import boto3
    from botocore.config import Config

    endpoint = (
        endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("S3_ENDPOINT_URL")
    )
    key = (endpoint, os.environ.get("AWS_ACCESS_KEY_ID"))
    config = Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 4})
    with _clients_lock:
        if key not in _clients:
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return _clients[key]


class S3Store:
    def __init__(self, bucket: str, prefix: str, endpoint: str | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix + '/' if self.prefix else ''}"
        self.client = s3_client(endpoint)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        return sorted(keys)

    def upload_file(self, local: Path, key: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(key))

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(self.bucket, self._key(key), str(local))

    def write_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def read_bytes(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})


def open_store(uri: str, endpoint: str | None = None) -> ArtifactStore:
    """The store rooted at `uri`: s3://bucket/prefix (at `endpoint`, else the environment's), file:///path,
    or a plain local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"{uri!r}: an s3 URI needs a bucket, e.g. s3://my-bucket/runs")
        return S3Store(parsed.netloc, parsed.path, endpoint)
    if parsed.scheme == "file":
        # file://./runs is relative (netloc '.'), file:///abs is absolute.
        return LocalStore((parsed.netloc + parsed.path) if parsed.netloc else parsed.path)
    if not parsed.scheme:
        return LocalStore(uri)
    raise ValueError(f"{uri!r}: unsupported scheme {parsed.scheme!r}; use a path, file:// or s3://")


def local_path_of(store: ArtifactStore, key: str, prefix: str, local_dir: Path) -> Path:
    """Where the object `key` (under `prefix`) lands in `local_dir`. A key that would land outside it
    (`..`, an absolute path: whoever can write to the store could otherwise overwrite any file the
    process can) is refused."""
    relative = PurePosixPath(key[len(prefix) :])
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"{store.uri}{key}: a key that leads outside the folder it is copied into; refused")
    return local_dir / relative


def sync_down(store: ArtifactStore, prefix: str, local_dir: Path) -> Path:
    """Copy every object under `prefix` into `local_dir`, keeping relative paths."""
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = store.list(prefix)
    if not keys:
        raise FileNotFoundError(f"nothing stored under {store.uri}{prefix}")
    targets = [(key, local_path_of(store, key, prefix, local_dir)) for key in keys]  # all checked before any copy
    for key, target in targets:
        store.download_file(key, target)
    return local_dir


def cache_folder() -> Path:
    """POTENTIAL_MEME_CACHE, else $XDG_CACHE_HOME/potential-meme, else ~/.cache/potential-meme."""
    if explicit := os.environ.get("POTENTIAL_MEME_CACHE"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "potential-meme"


def download_to_scratch(uri: str, purpose: str) -> Path:
    """Copy everything under `uri` into a scratch folder that is removed when the process exits."""
    local = Path(tempfile.mkdtemp(prefix=f"potential-meme-{purpose}-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    return sync_down(open_store(uri), "", local)


def sync_up(store: ArtifactStore, local_dir: Path, prefix: str) -> list[str]:
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = []
    for path in _files_in(local_dir):
        key = prefix + str(path.relative_to(local_dir))
        store.upload_file(path, key)
        keys.append(key)
    return keys


def publish_folder(store: ArtifactStore, local_dir: Path, prefix: str) -> list[dict[str, Any]]:
    """Upload a folder under `prefix`; returns each file's key, size and sha256, as a manifest lists them for
    every later reader to check."""
    return [
        {"path": key, "sha256": file_sha256(path), "bytes": path.stat().st_size}
        for key, path in zip(sync_up(store, local_dir, prefix), _files_in(local_dir), strict=True)
    ]


def _files_in(local_dir: Path) -> list[Path]:
    return sorted(p for p in Path(local_dir).rglob("*") if p.is_file())


def read_json(store: ArtifactStore, key: str) -> Any:
    return json.loads(store.read_bytes(key))


def read_json_if_exists(store: ArtifactStore, key: str) -> Any | None:
    return read_json(store, key) if store.exists(key) else None


def write_json(store: ArtifactStore, key: str, value: Any) -> None:
    store.write_bytes(key, json.dumps(value, indent=2, sort_keys=True).encode())
