"""Where a chain's run folder lives: a local (or shared POSIX) path, or object storage that pyarrow opens
(`s3://bucket/prefix`, `gs://...`, `hdfs://...`, `abfs://...`).

Everything the driver keeps in a run folder (the manifest, each task's checkpoint, the exported adapter, the
owner's lease) is read and written through `RunFolder`, one pyarrow filesystem and a path in it, with the
same guarantee everywhere: a reader sees a file or folder whole or not at all.

- A file is replaced whole: locally through a temporary sibling and a rename; in object storage by a single
  PUT, which stores are atomic about (a reader gets the old object or the new one).
- A folder is published locally by a rename of a staging folder. Object storage has no rename, so its
  files are uploaded under the folder's key and a `_SUCCESS` marker object is written last (Hadoop's and
  Spark's convention); a folder without its marker is incomplete and is never read (`is_complete`). The
  manifest names a task's checkpoint only after its publish, with the sha256 of its tensors.

Credentials and endpoints come from the environment, as every AWS / GCS tool takes them
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, an instance role, ...), or from the URI's query
(`s3://bucket/runs?endpoint_override=...&region=...`, pyarrow's syntax), which children of the folder keep.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from procl.atomic import atomic_directory, atomic_write_text

COMPLETE_MARKER = "_SUCCESS"
# the object stores and distributed filesystems pyarrow.fs opens from a URI
URI_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
_CHUNK = 1 << 20


def is_uri(location: str | Path) -> bool:
    """A location with a scheme (`s3://...`) rather than a path; `file://` counts as a path."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


@dataclass(frozen=True)
class RunFolder:
    """A folder (or file) on a pyarrow filesystem: `RunFolder.at("runs/demo")`, `RunFolder.at("s3://b/runs") / "demo"`."""

    filesystem: pafs.FileSystem
    path: str  # in the filesystem's own terms: an absolute local path, or "bucket/key" in object storage
    scheme: str = ""  # "" for the local filesystem
    query: str = ""  # the URI's query (endpoint, region), kept for the URIs of children

    @classmethod
    def at(cls, location: str | Path) -> RunFolder:
        location = str(location)
        if not is_uri(location):
            path = Path(location.removeprefix("file://")).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), path.as_posix())
        parts = urlsplit(location)
        try:
            filesystem, path = pafs.FileSystem.from_uri(location)
        except (pafs.ArrowInvalid, OSError, ValueError) as error:  # an unknown scheme, a bad query parameter
            raise ValueError(f"{location}: not a location pyarrow can open ({error})") from error
        return cls(filesystem, path.rstrip("/"), parts.scheme, f"?{parts.query}" if parts.query else "")

    # -- naming ---------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local_path(self) -> Path | None:
        return Path(self.path) if self.is_local else None

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> RunFolder:
        return RunFolder(self.filesystem, self.path.rstrip("/").rsplit("/", 1)[0], self.scheme, self.query)

    def __truediv__(self, name: str) -> RunFolder:
        return RunFolder(self.filesystem, f"{self.path.rstrip('/')}/{name}", self.scheme, self.query)

    def __str__(self) -> str:
        """How the location is written in the manifest and in messages: a path, or a URI that `at` reopens."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}{self.query}"

    # -- files ----------------------------------------------------------------------------------------
    def _type(self) -> pafs.FileType:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def read_text(self) -> str:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, text: str) -> None:
        """Replace the file whole (see the module's docstring)."""
        if self.is_local:
            atomic_write_text(self.path, text)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove the file (or the folder, with everything in it) if it is there."""
        kind = self._type()
        if kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)
        elif kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)

    def sha256(self) -> str:
        """The file's sha256, streamed (an object is never downloaded whole first)."""
        digest = hashlib.sha256()
        with self.filesystem.open_input_stream(self.path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def make(self) -> None:
        """Create the folder (object storage creates prefixes as objects arrive: nothing to do unless a bucket)."""
        self.filesystem.create_dir(self.path, recursive=True)

    def probe_writable(self) -> None:
        """Write and delete a small file in the folder: an unwritable location fails now, not at the first checkpoint."""
        probe = self / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("")
        probe.delete()

    # -- folders --------------------------------------------------------------------------------------
    def is_complete(self) -> bool:
        """A folder whose publish finished: it exists (local, published by rename) or has its marker."""
        if self.is_local:
            return self._type() == pafs.FileType.Directory
        return (self / COMPLETE_MARKER).is_file()

    def publish(self, local_folder: Path) -> None:
        """Put a copy of `local_folder` here, whole or not at all (see the module's docstring)."""
        if self.is_local:
            with atomic_directory(self.path) as staging:
                shutil.copytree(local_folder, staging, dirs_exist_ok=True)
            return
        (self / COMPLETE_MARKER).delete()  # incomplete from here until the new files are all up
        self.delete()
        pafs.copy_files(str(local_folder), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.filesystem)
        (self / COMPLETE_MARKER).write_text("")

    @contextmanager
    def local_copy(self) -> Iterator[Path]:
        """The file or folder as a local path for reading: itself when local, else a temporary download (a folder
        only once complete, its marker left out)."""
        if self.is_local:
            yield Path(self.path)
            return
        is_file = self.is_file()
        if not is_file and not self.is_complete():
            raise FileNotFoundError(f"{self} is not a complete folder (no {COMPLETE_MARKER} marker)")
        with tempfile.TemporaryDirectory(prefix="procl-download-") as temporary:
            target = Path(temporary) / self.name
            if not is_file:
                target.mkdir()  # copy_files creates a folder's subfolders, not the folder itself
            pafs.copy_files(self.path, str(target), source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem())
            if not is_file:
                (target / COMPLETE_MARKER).unlink()
            yield target


def read_state_at(location: str | Path) -> tuple[dict, dict]:
    """`procl.checkpoint.read_state` of a state folder at a path or a URI (downloaded first from object storage)."""
    from procl.checkpoint import read_state

    with RunFolder.at(location).local_copy() as folder:
        return read_state(folder)
