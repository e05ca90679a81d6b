"""Content-addressed artifacts: every stage's output lives under ``<cache_dir>/<stage>/<key>/``.

The key is the hash of exactly the settings that determine the artifact (its *spec*), so a
rerun with the same settings finds it, and a change of any input produces a new key instead
of silently reusing a stale file. Offline anchoring makes this matter: a stale rollout cache
would bias log Ẑ without any visible error.

Guarantees:
- files are written to a temporary name and renamed into place (atomic on POSIX), so a
  crash never leaves a half-written file under its final name;
- an artifact is *complete* only once its ``manifest.json`` exists; the manifest records the
  spec, the package version, and the SHA-256 and row count of every file, checked on read;
- sharded builders (sampling, scoring) write one file per shard, so a killed build resumes
  from the shards already written; each shard's SHA-256 is recorded (``shards/.<name>.sha256``,
  written before the shard) and checked before a shard is skipped, read or sealed into the
  manifest, so a corrupted shard is reported instead of resumed from;
- readers see exactly the files the manifest lists (a stray file is never picked up);
- a per-artifact ``fcntl`` lock makes concurrent jobs (joblib sweeps) build each artifact once;
  the holder removes temp files left by killed writers, and every build attempt is journaled
  in ``.builds.jsonl`` (start with the shards found, finish), the manifest recording who
  built it (``built_by``);
- inside one build, many workers (processes, Ray tasks, SLURM array tasks) fill the shards
  together (:meth:`Artifact.fill_shards`): a worker builds a shard only while it holds that
  shard's *claim*, an ``fcntl`` lock on ``shards/.<name>.claim`` that the kernel releases when
  the worker dies, so a worker killed mid-shard loses that shard only and any other worker
  redoes it. Every shard built is journaled in ``.shards.jsonl`` (who, how long). The
  artifact is sealed (:meth:`Artifact.finalize`) once every shard exists and matches the
  checksum recorded for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pandas as pd

from disa import __version__

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class CacheError(RuntimeError):
    """A cached artifact is missing, corrupted or inconsistent with its manifest."""


class CacheWriteError(CacheError, OSError):
    """A file could not be written (disk full, permission): a :class:`CacheError` that is
    also the ``OSError`` it came from (its ``errno`` kept)."""


def spec_key(spec: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of a JSON-serialisable spec (key order does not matter)."""
    blob = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temp file in the same
    directory, which is fsynced, given the permissions the umask allows (as ``open`` would;
    a temp file starts at 0600, which would keep a shared cache from the group) and renamed
    into place (atomic within one directory, whatever filesystem it is on).

    On failure (disk full, permission, an exception of ``write``) the previous file at
    ``path`` is left untouched, no temp file remains, and an ``OSError`` is raised as a
    :class:`CacheWriteError` naming the file.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        cause = _os_error(e)
        if cause is not None:
            err = CacheWriteError(f"could not write {path}: {cause}")
            err.errno = cause.errno
            raise err from e
        raise


def _os_error(e: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``e``: itself, or one it was raised while handling (torch's
    zip writer turns a full disk into a RuntimeError about file positions)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """:func:`atomic_write` of ``data``."""
    atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` to write a large file into piece by piece;
    on leaving the block it is fsynced and renamed into place (atomically, as
    :func:`atomic_write_bytes`). On any error the temp file goes and ``path`` is untouched."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise CacheError(f"could not write {path}: {e}") from e
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


class Artifact:
    """One cached artifact: a directory of files plus a manifest that makes it complete."""

    def __init__(self, root: Path, stage: str, spec: Mapping[str, Any]):
        self.stage = stage
        self.spec = dict(spec)
        self.key = spec_key(self.spec)
        self.path = root / stage / self.key

    def __repr__(self) -> str:
        return f"Artifact({self.stage}/{self.key})"

    # -- state ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise CacheError(f"{self} is not complete: {self.manifest_path} is missing") from None
        except json.JSONDecodeError as e:
            raise CacheError(f"{self.manifest_path} is corrupted: {e}") from e

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock across processes; the holder builds, the others wait then reuse."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- writing -------------------------------------------------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        path = self.path / f"{name}.parquet"
        atomic_write_parquet(path, df)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / f"{name}.json"
        atomic_write_json(path, obj)
        return path

    def shard_path(self, index: int, prefix: str = "part") -> Path:
        return self.path / "shards" / f"{prefix}-{index:05d}.parquet"

    @staticmethod
    def _checksum_path(shard: Path) -> Path:
        return shard.with_name(f".{shard.name}.sha256")

    def _check_shard(self, path: Path) -> None:
        """Raise :class:`CacheError` unless ``path`` matches the checksum recorded for it."""
        record = self._checksum_path(path)
        if record.exists():
            if file_sha256(path) != record.read_text().strip():
                raise CacheError(
                    f"{self}: shard {path} does not match the checksum recorded when it was "
                    f"written (truncated or corrupted); delete it to rebuild"
                )
        else:  # written before shard checksums existed: at least it must parse
            self._parse_shard(path)

    def has_shard(self, index: int, prefix: str = "part") -> bool:
        """Whether shard ``index`` was written (by this or an earlier, possibly killed, build).

        A shard that exists but does not match its recorded checksum is a :class:`CacheError`,
        never silently skipped over (resumed from) nor rebuilt.
        """
        path = self.shard_path(index, prefix)
        if not path.exists():
            return False
        self._check_shard(path)
        return True

    def write_shard(self, index: int, df: pd.DataFrame, prefix: str = "part") -> None:
        import io

        path = self.shard_path(index, prefix)
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        data = buf.getvalue()
        # checksum first: a kill in between leaves a record without a shard, which is redone
        atomic_write_bytes(
            self._checksum_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode()
        )
        atomic_write_bytes(path, data)

    # -- many workers, one artifact ----------------------------------------------------------
    @contextlib.contextmanager
    def claim(self, index: int, prefix: str = "part") -> Iterator[bool]:
        """Try to claim shard ``index`` without waiting: yields True while this process holds
        the claim (and alone may write the shard), False when another worker holds it.

        The claim is an ``fcntl`` lock, so a worker that dies, even by SIGKILL, releases it.
        """
        shard = self.shard_path(index, prefix)
        shard.parent.mkdir(parents=True, exist_ok=True)
        with open(shard.with_name(f".{shard.name}.claim"), "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def fill_shards(
        self,
        units: list[tuple[str, int]],
        make: Callable[[str, int], pd.DataFrame],
        *,
        poll_s: float = 0.5,
    ) -> int:
        """Write every shard of ``units`` (``(prefix, index)`` pairs) that is missing, each as
        ``make(prefix, index)``, together with any other workers doing the same; return how
        many this worker wrote.

        A worker writes a shard only under its claim (:meth:`claim`). Shards claimed by
        others are waited for, and taken over if their worker dies. ``make`` must be a pure
        function of the shard (seeded by its index), so that which worker writes a shard
        does not change its bytes. Each shard written is journaled in ``.shards.jsonl``.
        """
        built, pending = 0, list(units)
        while pending:
            held = []
            for prefix, i in pending:
                if self.has_shard(i, prefix):
                    continue
                with self.claim(i, prefix) as mine:
                    if not mine:
                        held.append((prefix, i))
                        continue
                    if self.has_shard(i, prefix):  # written while we were claiming it
                        continue
                    self._remove_shard_temps(self.shard_path(i, prefix))  # of a killed worker
                    t0 = time.perf_counter()
                    df = make(prefix, i)
                    self.write_shard(i, df, prefix)
                    self._journal_shard(prefix, i, len(df), time.perf_counter() - t0)
                    built += 1
            pending = held
            if pending:
                time.sleep(poll_s)
        return built

    def missing_shards(self, units: list[tuple[str, int]]) -> list[str]:
        """The names of the shards of ``units`` that do not exist (yet)."""
        return [
            self.shard_path(i, prefix).name
            for prefix, i in units
            if not self.shard_path(i, prefix).exists()
        ]

    def _remove_shard_temps(self, shard: Path) -> None:
        for p in shard.parent.glob(f".{shard.name}.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()
        for p in shard.parent.glob(f"..{shard.name}.sha256.*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()

    def _journal_shard(self, prefix: str, index: int, rows: int, seconds: float) -> None:
        line = json.dumps(
            {
                "shard": f"{prefix}-{index:05d}",
                "rows": rows,
                "seconds": round(seconds, 4),
                "done": round(time.time(), 3),
                **_who(),
            }
        )
        with contextlib.suppress(OSError), open(self.path / ".shards.jsonl", "a") as f:
            f.write(line + "\n")

    def shard_journal(self) -> list[dict[str, Any]]:
        """One entry per shard written: ``shard``, ``rows``, ``seconds`` (to build it), ``done``
        (Unix time it was written) and who wrote it (``pid``, ``host``)."""
        path = self.path / ".shards.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]

    def _parse_shard(self, path: Path) -> pd.DataFrame:
        try:
            return pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for truncated/corrupted files
            raise CacheError(
                f"{self}: shard {path} is unreadable ({e}); delete it to rebuild"
            ) from e

    def read_shard(self, index: int, prefix: str = "part") -> pd.DataFrame:
        """A shard written by an earlier (possibly killed) build; corrupted -> CacheError."""
        path = self.shard_path(index, prefix)
        self._check_shard(path)
        return self._parse_shard(path)

    def finalize(self, **info: Any) -> None:
        """Record every file's checksum and row count; from now on the artifact is complete."""
        files = {}
        for p in sorted(self.path.rglob("*")):
            if p.is_file() and p.name not in (MANIFEST, ".lock") and not p.name.startswith("."):
                rel = str(p.relative_to(self.path))
                entry: dict[str, Any] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                record = self._checksum_path(p)
                if record.exists() and record.read_text().strip() != entry["sha256"]:
                    raise CacheError(
                        f"{self}: shard {p} does not match the checksum recorded when it "
                        f"was written (truncated or corrupted); delete it to rebuild"
                    )
                if p.suffix == ".parquet":
                    import pyarrow.parquet as pq

                    entry["rows"] = pq.read_metadata(p).num_rows
                files[rel] = entry
        atomic_write_json(
            self.manifest_path,
            {
                "stage": self.stage,
                "key": self.key,
                "spec": self.spec,
                "version": __version__,
                "files": files,
                "built_by": _who(),
                **info,
            },
        )

    # -- reading -------------------------------------------------------------------------
    def verify(self) -> dict[str, Any]:
        """Check every file listed in the manifest; raise :class:`CacheError` naming the bad one."""
        manifest = self.manifest()
        if manifest.get("key") != self.key:
            raise CacheError(
                f"{self.manifest_path} belongs to key {manifest.get('key')}, not {self.key}"
            )
        for rel, entry in manifest["files"].items():
            p = self.path / rel
            if not p.exists():
                raise CacheError(f"{self}: file {p} listed in the manifest is missing")
            if p.stat().st_size != entry["bytes"] or file_sha256(p) != entry["sha256"]:
                raise CacheError(
                    f"{self}: file {p} does not match its manifest checksum (truncated or "
                    f"corrupted); delete {self.path} to rebuild it"
                )
        return manifest

    def _listed(self, rel: str) -> Path:
        """Verify the artifact and return ``rel``'s path, which the manifest must list."""
        manifest = self.verify()
        if rel not in manifest["files"]:
            raise CacheError(f"{self}: {self.path / rel} is not listed in {self.manifest_path}")
        return self.path / rel

    def read_table(self, name: str, columns: list[str] | None = None) -> pd.DataFrame:
        """A table of the artifact; with ``columns``, only those of them it has (the others
        are never read, which keeps token lists out of memory)."""
        path = self._listed(f"{name}.parquet")
        if columns is not None:
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            columns = [c for c in columns if c in names]
        return pd.read_parquet(path, columns=columns)

    def file_path(self, rel: str) -> Path:
        """The path of a file the (verified) manifest lists, for a reader that maps or streams it."""
        return self._listed(rel)

    def shard_files(self, prefix: str = "part", verify: bool = True) -> list[tuple[Path, int]]:
        """``(path, rows)`` of the shards the manifest lists, in order; the artifact is
        verified first unless the caller has just done so (``verify=False``)."""
        files = (self.verify() if verify else self.manifest())["files"]
        return [
            (self.path / rel, int(entry["rows"]))
            for rel, entry in sorted(files.items())
            if rel.startswith(f"shards/{prefix}-") and rel.endswith(".parquet")
        ]

    def read_json(self, name: str) -> Any:
        return json.loads(self._listed(f"{name}.json").read_text())

    def read_shards(self, prefix: str = "part") -> pd.DataFrame:
        """The shards the manifest lists, in order (a file added later is not picked up)."""
        files = self.verify()["files"]
        parts = sorted(
            rel for rel in files if rel.startswith(f"shards/{prefix}-") and rel.endswith(".parquet")
        )
        if not parts:
            raise CacheError(f"{self}: {self.manifest_path} lists no shards {prefix}-*.parquet")
        return pd.concat([pd.read_parquet(self.path / p) for p in parts], ignore_index=True)

    def collect_shards(self, prefix: str = "part") -> pd.DataFrame:
        """All shards of ``prefix`` written so far, during a build (before the manifest)."""
        parts = sorted((self.path / "shards").glob(f"{prefix}-*.parquet"))
        return pd.concat(
            [self.read_shard(int(p.stem.rsplit("-", 1)[1]), prefix) for p in parts],
            ignore_index=True,
        )

    def remove_shards(self) -> None:
        """Drop build-time shards once their content is consolidated into a table."""
        shutil.rmtree(self.path / "shards", ignore_errors=True)

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    # -- build bookkeeping (call with the lock held) ----------------------------------------
    def remove_stale_temp_files(self) -> list[Path]:
        """Delete temp files of writers that died mid-write: the lock holder's own, and those
        of shards nobody claims (a shard being written by a live worker keeps its temp file)."""
        stale = []
        for p in self.path.rglob(".*.tmp"):
            if not p.is_file():
                continue
            if p.parent.name == "shards":
                name = p.name.lstrip(".").split(".parquet")[0]
                prefix, _, index = name.rpartition("-")
                if not index.isdigit():
                    continue
                with self.claim(int(index), prefix) as free:
                    if not free:
                        continue
                    with contextlib.suppress(OSError):
                        p.unlink()
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            stale.append(p)
        return stale

    @property
    def journal_path(self) -> Path:
        return self.path / ".builds.jsonl"

    def journal(self, event: str, **fields: Any) -> None:
        """Append one line to the build journal; best effort, never fails a build."""
        line = json.dumps({"event": event, **_who(), **fields}, default=str)
        with contextlib.suppress(OSError), open(self.journal_path, "a") as f:
            f.write(line + "\n")

    def builds(self) -> list[dict[str, Any]]:
        """The journal: one ``start`` per build attempt, one ``finish`` per completed build."""
        if not self.journal_path.exists():
            return []
        return [json.loads(ln) for ln in self.journal_path.read_text().splitlines() if ln.strip()]


def _who() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class Cache:
    """The artifact store rooted at ``cache_dir``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def artifact(self, stage: str, spec: Mapping[str, Any]) -> Artifact:
        return Artifact(self.root, stage, spec)

    def has_any(self, stage: str) -> bool:
        """Whether any complete artifact of ``stage`` is cached (a cheap check, before a job
        spends time on work that needs one)."""
        return any((p / MANIFEST).exists() for p in (self.root / stage).glob("*"))

    def build(
        self, stage: str, spec: Mapping[str, Any], builder: Callable[[Artifact], dict | None]
    ) -> tuple[Artifact, bool]:
        """Return the complete artifact for ``spec``, running ``builder`` only if needed.

        ``builder(artifact)`` writes files into ``artifact.path`` (it may resume from shards
        it finds there) and returns extra manifest fields. Returns ``(artifact, reused)``.
        """
        art = self.artifact(stage, spec)
        if art.is_complete():
            art.verify()
            return art, True
        with art.lock():
            if art.is_complete():  # another job built it while we waited for the lock
                art.verify()
                return art, True
            stale = art.remove_stale_temp_files()
            found = len(list((art.path / "shards").glob("*.parquet")))
            if stale:
                log.warning("%s: removed %d temp file(s) left by a killed writer", art, len(stale))
            if found:
                log.info(
                    "%s: resuming an interrupted build from %d shard(s) in %s",
                    art,
                    found,
                    art.path / "shards",
                )
            art.journal("start", shards_found=found, stale_temp_files=len(stale))
            info = builder(art) or {}
            art.finalize(**info)
            art.journal("finish")
        return art, False
