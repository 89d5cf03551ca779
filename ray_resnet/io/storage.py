"""Where run dirs, sweep dirs and datasets live (pure): a local path, or any URI pyarrow.fs resolves (s3://, gs://,
file://, ...). A location is a plain string; `join` builds one from another.

Every write is atomic and durable: a reader (a rerun, a resume, `report`) sees the previous file or the whole new
one, never a torn one, even after a crash. Locally the bytes go to a temp file in the same directory, are fsynced,
and the temp file is renamed over the target; an object store shows a PUT only once it is complete.

Credentials and endpoints come from where pyarrow and boto3 read them: instance roles, the AWS_* / GOOGLE_*
environment variables, and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for S3-compatible stores. A URI carrying
user:password@ is refused, so a secret never reaches a config.yaml, a log or an error message.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import json
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from ray_resnet.errors import StorageError

# Where an object store is (never a secret): Ray's processes get these from the driver (see train.connect).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_EC2_METADATA_DISABLED", "STORAGE_EMULATOR_HOST")
# How long the first contact with an object store may take before it counts as not answering (seconds): pyarrow's
# own retries can take minutes against an endpoint that accepts connections but never replies.
ANSWER_TIMEOUT_S = 20
# What a filesystem object is made from besides its URI (it reads them once): a change means a new one.
_CLIENT_ENV = (*ENDPOINT_ENV, "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS")
# How many times one S3 request is tried (AWS's standard retry mode: 5xx answers, throttling and dropped
# connections, with jittered exponential backoff of at most 20 s between tries; pyarrow's default is 3). A store
# that is out for a few seconds is then ridden out; a longer outage is still bounded by ANSWER_TIMEOUT_S for small
# requests, and fails the run's attempt, which Ray restarts from the latest checkpoint (run.max_failures).
S3_ATTEMPTS = 10
# How many small files `read_files` fetches at once: an object store answers each in tens of milliseconds, most
# of it waiting, so reads overlap well; locally they are page-cache reads.
READ_THREADS = 16
READ_ATTEMPTS, READ_RETRY_PAUSE_S = 3, 0.2  # a broken read's second try waits 0.2 s, its third 0.4 s
T = TypeVar("T")


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def checked_uri(location: str | os.PathLike) -> str:
    """`location`, unless it is a URI that ray-resnet and Ray's storage (pyarrow) would read differently: then a
    StorageError that names the fix."""
    location = str(location)
    if not is_uri(location):
        return location
    if "?" in location or "#" in location:
        raise StorageError(f"{location}: a URI's ?query or #fragment is read one way here and another by Ray's "
                           "storage: give the bucket and path alone, and the endpoint or region in the environment "
                           "(AWS_ENDPOINT_URL, AWS_REGION)")
    host = urlsplit(location).netloc
    if location.startswith("file://") and host not in ("", "localhost"):
        raise StorageError(f"{location}: file:// is followed by an absolute path (file:///abs/path, three slashes); "
                           f"here '{host}' would be read as a host and dropped: give file:///... or a plain path")
    return location


def absolute(location: str | os.PathLike) -> str:
    """A URI as given (without a trailing slash), a local path (or file:// URI) as an absolute path."""
    location = checked_uri(location)
    if location.startswith("file://"):
        location = urlsplit(location).path
    return location.rstrip("/") if is_uri(location) else str(Path(location).expanduser().resolve())


def join(location: str | os.PathLike, *parts: str) -> str:
    location = str(location)
    return posixpath.join(location, *parts) if is_uri(location) else os.path.join(location, *parts)


def name(location: str) -> str:
    return posixpath.basename(location.rstrip("/")) if is_uri(location) else os.path.basename(location)


def parent(location: str) -> str:
    return posixpath.dirname(location.rstrip("/")) if is_uri(location) else os.path.dirname(location)


def filesystem(location: str | os.PathLike, retrying: bool = True) -> tuple[pafs.FileSystem, str]:
    """(the pyarrow filesystem, the path inside it) of a location; an S3 one tries each request S3_ATTEMPTS times
    unless not `retrying` (pyarrow's 3 tries: a first contact that fails says why in seconds)."""
    location = checked_uri(location)
    if not is_uri(location) or location.startswith("file://"):
        return pafs.LocalFileSystem(), absolute(location)
    parts = urlsplit(location)
    if "@" in parts.netloc:
        raise StorageError(f"{parts.scheme}://...@{parts.netloc.rsplit('@', 1)[1]}{parts.path}: credentials in a URI "
                           "would be written to config.yaml and logs; set them in the environment (AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS) or use an instance role")
    bucket = _retrying_bucket if retrying else _bucket
    fs, root = bucket(f"{parts.scheme}://{parts.netloc}", tuple(os.environ.get(k) for k in _CLIENT_ENV))
    return fs, posixpath.join(root, parts.path.lstrip("/")).rstrip("/")


@functools.lru_cache(maxsize=32)
def _bucket(root_uri: str, client_env: tuple) -> tuple[pafs.FileSystem, str]:
    """One filesystem per bucket and endpoint setting: resolving one (e.g. an S3 bucket's region) costs a request."""
    return _answered(root_uri, lambda: pafs.FileSystem.from_uri(root_uri))


@functools.lru_cache(maxsize=32)
def _retrying_bucket(root_uri: str, client_env: tuple) -> tuple[pafs.FileSystem, str]:
    fs, root = _bucket(root_uri, client_env)
    return (RetryingS3FileSystem(fs.__reduce__()[1][0]) if isinstance(fs, pafs.S3FileSystem) else fs), root


class RetryingS3FileSystem(pafs.S3FileSystem):
    """An S3FileSystem trying each request S3_ATTEMPTS times, also once pickled (Ray sends the run's filesystem to
    its controller and workers; pyarrow's own pickle form leaves the retry strategy out). `options`: the keyword
    arguments of an S3FileSystem (region, endpoint, credentials' source) as from_uri resolved them."""

    def __init__(self, options: dict):
        super().__init__(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))
        self.options = options

    def __reduce__(self):
        return type(self), (self.options,)


def for_ray(location: str) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray's RunConfig: an S3 location as its bucket path with the retrying
    filesystem (Ray's writes, its controller's included, then ride out what ours do), anything else as it is."""
    fs, path = filesystem(location)
    return (path, fs) if isinstance(fs, RetryingS3FileSystem) else (location, None)


def _answered(location: str, call: Callable[[], T], bounded: bool = True) -> T:
    """`call()`, or a StorageError naming `location` if it fails or (`bounded`: a small request, not a transfer
    that may take long) the store gives no answer in ANSWER_TIMEOUT_S."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except Exception as e:  # reported in the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)  # a hung request must not keep the process alive
    worker.start()
    worker.join(ANSWER_TIMEOUT_S if bounded else None)
    if worker.is_alive():
        raise StorageError(f"{location}: no answer from the object store in {ANSWER_TIMEOUT_S} s; check the endpoint "
                           "(AWS_ENDPOINT_URL for S3-compatible stores) and the network")
    error = outcome.get("error")
    if isinstance(error, FileNotFoundError):  # a missing file is an answer, for the caller to handle
        raise FileNotFoundError(location)
    if error is not None:
        raise StorageError(_explain(location, error)) from None
    return outcome["value"]


def _explain(location: str, error: Exception) -> str:
    """One line for a pyarrow or network error: what failed and what to check (pyarrow never puts keys in these)."""
    text = " ".join(str(error).split())[:240]
    low = text.lower()
    if location.startswith("s3://") and not _aws_credentials_configured():
        hint = ("no AWS credentials are configured here (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                "~/.aws/credentials; an instance role only where AWS_EC2_METADATA_DISABLED is unset), so the "
                "requests went unsigned: check the credentials")
    elif "unrecognized filesystem type" in low or "unable to load libjvm" in low or "hdfs" in low:
        hint = "pyarrow cannot open this kind of URI here: use a local path, s3://, gs:// or file://"
    elif "no_such_bucket" in low or "bucket" in low and "not found" in low or "nosuchbucket" in low:
        hint = "the bucket does not exist: create it first (e.g. aws s3 mb), or fix its name"
    elif any(k in low for k in ("access_denied", "accessdenied", "invalid_access_key", "credential", "forbidden",
                                "signature", "403")):
        hint = ("access was refused: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "the instance role; GOOGLE_APPLICATION_CREDENTIALS for gs://) and that they may use this bucket")
    elif any(k in low for k in ("http status 5", "slowdown", "service unavailable", "internalerror")):
        hint = ("the object store kept failing the request through its retries (an outage or throttling): "
                "check its status")
    elif any(k in low for k in ("curlcode: 7", "could not connect", "connection refused", "resolve host",
                                "timeout", "timed out", "network_connection")):
        hint = "cannot reach the object store: check the endpoint (AWS_ENDPOINT_URL for S3-compatible stores)"
    else:
        hint = "check the URI, the credentials and the endpoint"
    return f"{location}: {hint} ({type(error).__name__}: {text})"


def _aws_credentials_configured() -> bool:
    """Whether this process names AWS credentials itself (an instance role cannot be seen without asking for it)."""
    named = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    return (any(os.environ.get(k) for k in named) or any(Path(f).expanduser().is_file() for f in files)
            or os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true")


def _op(location: str, call: Callable[[pafs.FileSystem, str], T], bounded: bool = True) -> T:
    """`call(fs, path)` of a location; against an object store with one-line errors and, for small requests
    (`bounded`), at most ANSWER_TIMEOUT_S long."""
    fs, path = filesystem(location)
    if isinstance(fs, pafs.LocalFileSystem):
        return call(fs, path)
    return _answered(location, lambda: call(fs, path), bounded)


def info(location: str) -> pafs.FileInfo:
    return _op(location, lambda fs, path: fs.get_file_info(path))


def exists(location: str) -> bool:
    return info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    return info(location).type == pafs.FileType.File


def list_names(location: str) -> list[str]:
    """Names directly under a directory (sorted); [] if there is none."""
    def names(fs: pafs.FileSystem, path: str) -> list[str]:
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted({posixpath.basename(f.path.rstrip("/")) for f in found})

    return _op(location, names)


def glob(location: str, pattern: str) -> list[str]:
    """Locations under `location` matching `pattern` (fnmatch; `dir/name-*` matches one level down), sorted."""
    directory, _, leaf = pattern.rpartition("/")
    base = join(location, directory) if directory else location
    return [join(base, n) for n in list_names(base) if fnmatch.fnmatchcase(n, leaf)]


@dataclass(frozen=True)
class ListedFile:
    """A file found below a directory: its path from there ('/'-separated), when it was last written (seconds since
    the Unix epoch; on an object store the server's clock) and its size (bytes)."""

    path: str
    mtime_s: float
    size: int


def walk(location: str) -> list[ListedFile]:
    """Every file below a directory, with its modification time, sorted by path; [] if there is none. One
    recursive listing: on an object store one LIST request per 1,000 keys, however deep the tree."""
    def files(fs: pafs.FileSystem, path: str) -> list[ListedFile]:
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        return [ListedFile(posixpath.relpath(f.path, path), f.mtime.timestamp() if f.mtime else 0.0, f.size)
                for f in found if f.type == pafs.FileType.File]

    return sorted(_op(location, files), key=lambda f: f.path)


def file_sizes(location: str) -> dict[str, int]:
    """Every file below a directory (one recursive listing): its path relative to `location` (with /) -> its size
    in bytes, in path order; {} if there is no such directory."""
    return {f.path: f.size for f in walk(location)}


def walk_files(location: str) -> list[str]:
    """Every file below a directory, as locations (sorted)."""
    return [join(location, f.path) for f in walk(location)]


def read_bytes(location: str) -> bytes:
    """The file's bytes; FileNotFoundError if there is none."""
    def read(fs: pafs.FileSystem, path: str) -> bytes:
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(location)
        with fs.open_input_stream(path) as f:
            return f.read()

    return _op(location, read, bounded=False)


def read_from(location: str, offset: int) -> bytes:
    """The file's bytes from `offset` on (on an object store, one ranged request); FileNotFoundError if there is
    none."""
    def read(fs: pafs.FileSystem, path: str) -> bytes:
        with fs.open_input_file(path) as f:
            f.seek(offset)
            return f.read()

    return _op(location, read, bounded=False)


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def read_json(location: str) -> dict | None:
    """The JSON object in a file; None if there is none or it is not a whole JSON object (e.g. written by an older
    version that wrote in place and crashed mid-write): callers treat that like a missing file. A failed read is a
    StorageError, never "no file": a record read as missing would be overwritten."""
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    return parse_json(data)


def parse_json(data: bytes | None) -> dict | None:
    """The JSON object in a file's bytes; None for no bytes, torn or invalid JSON, or another JSON value."""
    try:
        value = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_files(locations: list[str]) -> list[bytes | None]:
    """The bytes of files a listing (`walk`) found, READ_THREADS at a time, in order, without first asking whether
    each is there; None for one deleted since. A read that fails is tried up to READ_ATTEMPTS times in all: a file
    deleted while it is read can break the answer's body instead of answering "no such key" (seen on moto's S3 when
    lease contenders drop their claims), which the store's own retries do not cover."""
    def read(location: str) -> bytes | None:
        def whole(fs: pafs.FileSystem, path: str) -> bytes:
            with fs.open_input_stream(path) as f:
                return f.read()

        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return _op(location, whole)
            except FileNotFoundError:
                return None
            except StorageError:
                if attempt == READ_ATTEMPTS:
                    raise
                time.sleep(READ_RETRY_PAUSE_S * attempt)

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, locations))


@contextlib.contextmanager
def atomic_file(location: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `location` through: it replaces `location` only when the block ends without error."""
    location = str(location)
    if is_uri(location):
        buffer = io.BytesIO()
        yield buffer
        _op(location, lambda fs, path: _put(fs, path, buffer.getvalue()), bounded=len(buffer.getvalue()) < 2**20)
        return
    path = Path(location)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_atomic(location: str | os.PathLike, data: bytes) -> str:
    with atomic_file(location) as f:
        f.write(data)
    return str(location)


def write_text(location: str | os.PathLike, text: str) -> str:
    return write_atomic(location, text.encode())


def read_table(location: str, columns: list[str]):
    """A parquet file (local or a URI) as a pyarrow Table of `columns`."""
    import pyarrow.parquet as pq

    return _op(location, lambda fs, path: pq.read_table(path, columns=columns, filesystem=fs), bounded=False)


def read_schema_names(location: str) -> list[str]:
    import pyarrow.parquet as pq

    return _op(location, lambda fs, path: pq.read_schema(path, filesystem=fs).names)


def remove(location: str) -> None:
    """Delete a file if it is there."""
    if exists(location):
        _op(location, lambda fs, path: fs.delete_file(path))


def upload_dir(local_dir: str | os.PathLike, location: str) -> None:
    """Copy every file of a local directory to `location` (same relative paths; existing files are replaced)."""
    if not is_uri(location):
        shutil.copytree(local_dir, location, dirs_exist_ok=True)
        return
    _op(location, lambda fs, path: pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                                                   destination_filesystem=fs, use_threads=False), bounded=False)


def download_dir(location: str, local_dir: str | os.PathLike) -> None:
    """Copy every file below `location` into a local directory."""
    if not exists(location):
        return
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    _op(location, lambda fs, path: pafs.copy_files(path, str(local_dir), source_filesystem=fs,
                                                   destination_filesystem=pafs.LocalFileSystem(), use_threads=False),
        bounded=False)


def check_writable(location: str) -> None:
    """Write and delete a small file under `location`, so a missing bucket, refused credentials, a silent endpoint,
    or a local path that is a file, read-only or full fail here in one line, before any training starts (local
    directories it makes for the probe are removed again). The probe's name is unique: runs and sweep trials check
    one storage at once. Tried as pyarrow does (3 times): a wrong endpoint or missing credentials are reported in
    seconds, and no request of this check is left retrying after its error."""
    fs, path = filesystem(location, retrying=False)
    probe = posixpath.join(path, f".ray-resnet-write-check-{uuid.uuid4().hex}")

    def write_and_delete() -> None:
        _put(fs, probe, b"ok")
        fs.delete_file(probe)

    if is_uri(location):
        _answered(location, write_and_delete)
        return
    made = [d for d in (Path(path), *Path(path).parents) if not d.exists()]  # deepest first
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        write_and_delete()
    except OSError as e:
        reason = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else (
            e.strerror or str(e))
        raise StorageError(f"{location}: cannot write there ({reason}): choose another storage (--storage / "
                           "run.storage), or free or fix that one") from None
    finally:  # a check leaves nothing behind: the first file a run writes makes the dirs again
        for directory in made:
            with contextlib.suppress(OSError):
                directory.rmdir()
