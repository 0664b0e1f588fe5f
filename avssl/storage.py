"""Where corpora and run folders live: a local path, or an object-store URI (`s3://bucket/prefix`,
`gs://`, any scheme pyarrow's filesystems know).

Object stores are reached through `pyarrow.fs` (what Ray Train uses for `storage_path`), which
reads the standard variables: `AWS_ENDPOINT_URL` (an S3-compatible server), `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `AWS_PROFILE`, `AWS_DEFAULT_REGION`, and on a cloud
machine its instance role. Credentials never go in config files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from avssl.errors import DataError

Location = Union[str, Path]


def is_remote(location: Location) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme_and_bucket: str, endpoint: str) -> Any:
    import pyarrow.fs

    fs, _ = pyarrow.fs.FileSystem.from_uri(scheme_and_bucket)
    return fs


def filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) of an object-store URI; one filesystem per bucket."""
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    try:
        fs = _filesystem(f"{scheme}://{bucket}", os.environ.get("AWS_ENDPOINT_URL", ""))  # a new endpoint, a new client
    except Exception as e:  # unknown scheme, no credentials, bad endpoint
        raise DataError(f"{uri}: cannot open this storage ({type(e).__name__}: {e})") from None
    return fs, rest.rstrip("/")


def join(root: Location, *parts: str) -> Location:
    if is_remote(root):
        return posixpath.join(str(root).rstrip("/"), *parts)
    return Path(root).joinpath(*parts)


@contextlib.contextmanager
def open_input(location: Location) -> Iterator[Any]:
    """A seekable binary file (an object store serves the ranges read: a zip directory costs one
    request, not the object); FileNotFoundError when it is not there."""
    if not is_remote(location):
        with open(location, "rb") as f:
            yield f
        return
    fs, path = filesystem(str(location))
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        if "not found" in str(e).lower() or "does not exist" in str(e).lower() or "NoSuchKey" in str(e):
            raise FileNotFoundError(str(location)) from None
        raise
    with f:
        yield f


def read_bytes(location: Location) -> bytes:
    """The whole object (shards are read one at a time, on the node that needs them)."""
    with open_input(location) as f:
        return f.read()


def write_bytes(location: Location, data: bytes) -> None:
    """Local: via a temporary file and a rename. Object stores: one PUT, which is atomic."""
    if not is_remote(location):
        from avssl.data.corpus import atomic_write_bytes

        atomic_write_bytes(Path(location), data)
        return
    fs, path = filesystem(str(location))
    with fs.open_output_stream(path) as f:
        f.write(data)


def size(location: Location) -> int:
    """Bytes of a file; FileNotFoundError when it is not there."""
    if not is_remote(location):
        return Path(location).stat().st_size
    import pyarrow.fs

    fs, path = filesystem(str(location))
    info = fs.get_file_info(path)
    if info.type != pyarrow.fs.FileType.File:
        raise FileNotFoundError(str(location))
    return int(info.size)


def is_file(location: Location) -> bool:
    try:
        size(location)
        return True
    except FileNotFoundError:
        return False


def upload(local: Path, uri: str, last: tuple[str, ...] = ("manifest.jsonl", "corpus.json")) -> None:
    """A local folder copied under `uri`, the files named in `last` after everything else: a
    corpus whose upload is interrupted is not mistaken for a whole one."""
    local = Path(local).resolve()
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.relative_to(local).as_posix() in last)
    for p in files:
        write_bytes(join(uri, p.relative_to(local).as_posix()), p.read_bytes())


def local_folder(storage_path: Location, name: str) -> Path:
    """A run's folder on this machine for what must stay local (artifacts MLflow did not take):
    the run folder itself when storage is local, else one under the system's temporary folder."""
    if not is_remote(storage_path):
        return Path(storage_path) / name
    import tempfile

    return Path(tempfile.gettempdir()) / "avssl-runs" / name


def fetch(location: Location) -> Optional[Path]:
    """A file as a local path: itself when local, else a temporary copy; None when it is not there."""
    if not is_remote(location):
        return Path(location) if Path(location).is_file() else None
    from avssl import scratch

    try:
        data = read_bytes(location)
    except FileNotFoundError:
        return None
    out = scratch.folder("fetch-") / str(location).rsplit("/", 1)[-1]
    out.write_bytes(data)
    return out


def copy_file(src: Location, dst: Location, chunk: int = 1 << 23) -> None:
    """A file copied in chunks (memory: one chunk), either end local or in an object store; a local
    destination appears whole (a temporary file, then a rename), an object when its upload ends."""
    with open_input(src) as fin:
        if is_remote(dst):
            fs, path = filesystem(str(dst))
            with fs.open_output_stream(path) as fout:
                while block := fin.read(chunk):
                    fout.write(block)
            return
        dst = Path(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fout:
            while block := fin.read(chunk):
                fout.write(block)
        os.replace(tmp, dst)
