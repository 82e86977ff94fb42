"""The systemd tests' cache of Debian trees (tests/nspawn_fixtures.py): a tree made from other
inputs is removed once no run uses it; one in use, and the current one, are kept."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import nspawn_fixtures as nsf


def _tree(cache: Path, name: str, nbytes: int = 1000) -> Path:
    d = cache / name
    (d / "root" / "usr").mkdir(parents=True)
    (d / "root" / "usr" / "blob").write_bytes(b"x" * nbytes)
    (d / "ok").write_text("{}\n")
    return d


def test_prune_removes_unused_trees_of_other_inputs(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ".lock").write_text("")
    current, old, busy = _tree(cache, "aaaa"), _tree(cache, "bbbb", 2_000_000), _tree(cache, "cccc")
    unfinished = cache / "dddd.tmp"
    (unfinished / "root").mkdir(parents=True)
    building_current = cache / "aaaa.tmp"
    building_current.mkdir()
    with open(cache / "cccc.use", "a") as use:  # another run boots cccc now
        fcntl.flock(use, fcntl.LOCK_SH)
        done = nsf.prune(cache, "aaaa")
        assert busy.exists() and (cache / "cccc.use").exists()
    assert current.exists() and building_current.exists()
    assert not old.exists() and not unfinished.exists() and not (cache / "bbbb.use").exists()
    assert any(line.startswith("removed the cached tree bbbb (2 MB)") for line in done), done
    assert len(done) == 2, done
    # cccc's run has ended: the next prune takes it
    assert nsf.prune(cache, "aaaa") == [
        "removed the cached tree cccc (0 MB): made from other inputs, not in use"]
    assert sorted(p.name for p in cache.iterdir()) == [".lock", "aaaa", "aaaa.tmp"]


def test_a_tree_in_use_is_held_on_the_file_that_is_there(tmp_path: Path) -> None:
    """A run that opened <key>.use just before a pruning run removed it holds a lock on the
    file at the path once it gets one, so the next pruning run sees the tree in use."""
    use = tmp_path / "k.use"
    pruner = open(use, "a")
    fcntl.flock(pruner, fcntl.LOCK_EX)  # a pruning run holds it
    holding, release = threading.Event(), threading.Event()

    def run() -> None:
        with nsf._held(use):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)  # the run has opened the file and waits for its lock
    assert not holding.is_set()
    use.unlink()  # the pruning run removes the tree and its lock file, then lets go
    pruner.close()
    assert holding.wait(5)
    try:
        with open(use, "a") as f:  # the next pruning run
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the tree in use could be taken")
            except BlockingIOError:
                pass
    finally:
        release.set()
        t.join(5)
