"""disa.cache: keys, build-once, integrity checks, resumable shards, atomic writes, locking."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import pandas as pd
import pytest

from disa import cache as cache_mod
from disa.cache import Cache, CacheError, atomic_write_bytes, spec_key

TABLE = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})


def test_spec_key_stable_under_key_order():
    a = {"task": {"n": 3, "seed": 1}, "beta": 2.0, "K": [1, 2]}
    b = {"K": [1, 2], "beta": 2.0, "task": {"seed": 1, "n": 3}}
    assert spec_key(a) == spec_key(b)
    assert len(spec_key(a)) == 16 and int(spec_key(a), 16) >= 0


@pytest.mark.parametrize(
    "change", [{"beta": 2.5}, {"K": [2, 1]}, {"task": {"n": 3, "seed": 2}}, {"extra": None}]
)
def test_spec_key_differs_for_different_specs(change):
    base = {"task": {"n": 3, "seed": 1}, "beta": 2.0, "K": [1, 2]}
    assert spec_key(base) != spec_key(base | change)


def _counting_builder(calls: list):
    def build(art):
        calls.append(art.key)
        art.write_table("t", TABLE)
        art.write_json("meta", {"ok": True})
        return {"note": "built"}

    return build


def test_build_once_then_reuse(tmp_path):
    c, calls = Cache(tmp_path), []
    art, reused = c.build("stage", {"x": 1}, _counting_builder(calls))
    assert not reused and len(calls) == 1 and art.is_complete()
    pd.testing.assert_frame_equal(art.read_table("t"), TABLE)
    assert art.read_json("meta") == {"ok": True}
    assert art.manifest()["note"] == "built" and art.manifest()["spec"] == {"x": 1}

    def never(_art):
        raise AssertionError("builder must not run for a cached artifact")

    art2, reused = Cache(tmp_path).build("stage", {"x": 1}, never)
    assert reused and art2.path == art.path
    art3, reused = c.build("stage", {"x": 2}, _counting_builder(calls))
    assert not reused and len(calls) == 2 and art3.path != art.path
    _, reused = c.build("other-stage", {"x": 1}, _counting_builder(calls))
    assert not reused and len(calls) == 3


def _built(tmp_path):
    art, _ = Cache(tmp_path).build("s", {"k": 1}, _counting_builder([]))
    return art


def test_truncated_file_is_detected(tmp_path):
    art = _built(tmp_path)
    f = art.path / "t.parquet"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CacheError, match="t.parquet"):
        art.verify()
    with pytest.raises(CacheError, match="t.parquet"):
        art.read_table("t")
    # and a rebuild attempt does not reuse it silently
    with pytest.raises(CacheError, match="t.parquet"):
        Cache(tmp_path).build("s", {"k": 1}, _counting_builder([]))


def test_flipped_byte_is_detected(tmp_path):
    art = _built(tmp_path)
    f = art.path / "t.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="t.parquet"):
        art.read_table("t")
    # the other file is untouched, but reading any file of a corrupted artifact is refused
    with pytest.raises(CacheError, match="t.parquet"):
        art.read_json("meta")


def test_missing_file_is_detected(tmp_path):
    art = _built(tmp_path)
    (art.path / "meta.json").unlink()
    with pytest.raises(CacheError, match="meta.json"):
        art.verify()


def test_failed_builder_leaves_incomplete_artifact_and_rerun_builds(tmp_path):
    c = Cache(tmp_path)

    def boom(art):
        art.write_table("t", TABLE)
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        c.build("s", {"k": 1}, boom)
    art = c.artifact("s", {"k": 1})
    assert not art.is_complete() and not art.manifest_path.exists()
    with pytest.raises(CacheError):
        art.read_table("t")
    calls = []
    art, reused = c.build("s", {"k": 1}, _counting_builder(calls))
    assert not reused and calls == [art.key] and art.is_complete()


def test_shards_survive_a_crash_and_resume_skips_them(tmp_path):
    c, spec, n_shards = Cache(tmp_path), {"sharded": True}, 5
    computed = []

    def builder(crash_after: int | None):
        def build(art):
            for i in range(n_shards):
                if art.has_shard(i):
                    continue
                if crash_after is not None and i == crash_after:
                    raise KeyboardInterrupt  # killed mid-build
                computed.append(i)
                art.write_shard(i, pd.DataFrame({"i": [i, i], "v": [10 * i, 10 * i + 1]}))
            art.write_table("all", art.collect_shards())
            art.remove_shards()
            return None

        return build

    with pytest.raises(KeyboardInterrupt):
        c.build("sample", spec, builder(crash_after=3))
    art = c.artifact("sample", spec)
    assert not art.is_complete()
    assert [art.has_shard(i) for i in range(n_shards)] == [True, True, True, False, False]
    assert computed == [0, 1, 2]
    art, reused = c.build("sample", spec, builder(crash_after=None))
    assert not reused and computed == [0, 1, 2, 3, 4]  # shards 0-2 were not recomputed
    got = art.read_table("all")
    assert got.i.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert not (art.path / "shards").exists()


def test_unreadable_shard_is_a_cache_error(tmp_path):
    art = Cache(tmp_path).artifact("s", {"k": 1})
    art.write_shard(0, TABLE)
    p = art.shard_path(0)
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(CacheError, match=p.name):
        art.read_shard(0)


def test_atomic_write_failure_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.json"
    atomic_write_bytes(target, b"old content")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", failing_replace)
    with pytest.raises(CacheError, match=str(target)):
        atomic_write_bytes(target, b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]  # no temp file left behind


def test_atomic_write_failure_while_writing_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cache_mod.os, "fsync", failing_fsync)
    with pytest.raises(CacheError, match=str(target)):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_unwritable_directory_names_the_file(tmp_path, monkeypatch):
    """Creating the temp file in a read-only directory fails; the error must still be a
    CacheError naming the file (as the docstring promises), and the old file stays."""
    target = tmp_path / "ro" / "file.json"
    atomic_write_bytes(target, b"old")
    if os.geteuid() == 0:  # root ignores directory modes: simulate what mkstemp raises

        def no_permission(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(target.parent))

        monkeypatch.setattr(cache_mod.tempfile, "mkstemp", no_permission)
    else:
        target.parent.chmod(0o500)
    try:
        with pytest.raises(CacheError, match=str(target)):
            atomic_write_bytes(target, b"new")
    finally:
        monkeypatch.undo()
        target.parent.chmod(0o700)
    assert target.read_bytes() == b"old"


# -- two processes, one build -----------------------------------------------------------------
def _concurrent_build(root: str, log: str, barrier, results) -> None:
    def build(art):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for the other process to arrive while we hold the lock
        art.write_table("t", TABLE)
        return None

    barrier.wait()
    art, reused = Cache(root).build("s", {"shared": 1}, build)
    results.put((reused, len(art.read_table("t"))))


def test_concurrent_processes_build_once(tmp_path):
    ctx = mp.get_context("fork")
    log = tmp_path / "builds.log"
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(
            target=_concurrent_build, args=(str(tmp_path / "c"), str(log), barrier, results)
        )
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert log.read_text().count("\n") == 1  # the builder ran exactly once
    assert outcomes == [(False, 3), (True, 3), (True, 3)]


def test_manifest_records_checksums(tmp_path):
    art = _built(tmp_path)
    m = json.loads(Path(art.manifest_path).read_text())
    assert set(m["files"]) == {"t.parquet", "meta.json"}
    assert m["files"]["t.parquet"]["rows"] == 3
    assert m["files"]["t.parquet"]["sha256"] == cache_mod.file_sha256(art.path / "t.parquet")
