"""The host-wide id-range registry: what a crash at any step leaves is never an orphan."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion_server.runtime.idmap import IdRangeRegistry


@pytest.fixture
def registry(tmp_path: Path) -> IdRangeRegistry:
    return IdRangeRegistry(tmp_path / "registry")


def _entries(registry: IdRangeRegistry) -> dict[str, list[str]]:
    return {e.name: e.read_text().split() for e in registry.directory.iterdir() if e.name.isdigit()}


def test_a_range_is_registered_and_recorded(registry: IdRangeRegistry, tmp_path: Path) -> None:
    owner = tmp_path / "sessions" / "ses_a"
    owner.mkdir(parents=True)
    rng = registry.take(owner)
    assert IdRangeRegistry.recorded(owner) == rng
    assert list(_entries(registry).values()) == [[str(owner)]]
    registry.release(rng, owner)
    assert _entries(registry) == {}


def test_a_rename_cut_short_leaves_the_range_held(
    registry: IdRangeRegistry, tmp_path: Path
) -> None:
    sessions = tmp_path / "sessions"
    pool, session = sessions / "pool_1", sessions / "ses_b"
    pool.mkdir(parents=True)
    rng = registry.take(pool)
    with pytest.raises(RuntimeError), registry.moving(rng, pool, session):
        pool.rename(session)
        raise RuntimeError("the server dies here")
    # Both names are registered: the range is not stale (not free to take) ...
    assert [str(pool), str(session)] in _entries(registry).values()
    (sessions / "other").mkdir()
    assert registry.take(sessions / "other") != rng
    # ... and the start-up sweep keeps only the name that holds it.
    assert registry.release_stale(sessions) == 0
    assert [str(session)] in _entries(registry).values()
    registry.release(rng, session)
    assert [str(session)] not in _entries(registry).values()


def test_sweep_removes_stale_and_torn_entries_of_this_server_only(
    registry: IdRangeRegistry, tmp_path: Path
) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    kept, gone, other = mine / "ses_kept", mine / "ses_gone", theirs / "ses_other"
    for d in (kept, gone, other):
        d.mkdir(parents=True)
    held = registry.take(kept)
    registry.take(gone)
    registry.take(other)
    (gone / IdRangeRegistry.RECORD).unlink()  # a crash between the two writes of take
    gone.rmdir()
    (other / IdRangeRegistry.RECORD).unlink()  # stale too, but another server's
    (registry.directory / "31999").write_text("")  # torn: a crash mid-write
    assert registry.release_stale(mine) == 2
    owners = sorted(o for names in _entries(registry).values() for o in names)
    assert owners == sorted([str(kept), str(other)])
    assert IdRangeRegistry.recorded(kept) == held
