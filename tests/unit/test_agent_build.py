"""The sandbox agent is built by set-up and only looked for by the server.

:func:`find_agent` is what ``bastion serve`` calls at start: it must refuse, naming the
fix, a missing build and a build of another source, and accept the build of the
source as it is.  The builds here are of copies of the real source in a temporary
directory (a few seconds of gcc each), never of the installation's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bastion_server.runtime import agent_build
from bastion_server.runtime.agent_build import (
    SOURCE,
    AgentBuildError,
    AgentNotBuilt,
    binary_path,
    build_agent,
    find_agent,
)
from bastion_server.runtime.host import HostNotReady

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    copy = tmp_path / "src" / "bastion-agent.c"
    copy.parent.mkdir()
    shutil.copyfile(SOURCE, copy)
    return copy


def test_missing_build_is_refused_naming_the_fix(tmp_path: Path, source: Path) -> None:
    with pytest.raises(AgentNotBuilt) as info:
        find_agent(tmp_path / "bin", source)
    message = str(info.value)
    assert "not built" in message
    assert "make setup" in message and "bastion image build" in message
    # bastion serve prints a HostNotReady and exits 2, without a traceback.
    assert isinstance(info.value, HostNotReady)


@needs_gcc
def test_build_is_found_then_stale_after_a_source_change(tmp_path: Path, source: Path) -> None:
    out = tmp_path / "bin"
    built = build_agent(out, source)
    assert built == binary_path(out, source)
    assert os.access(built, os.X_OK)
    assert find_agent(out, source) == built
    assert build_agent(out, source) == built  # up to date: nothing to do
    assert built.stat().st_mtime_ns == binary_path(out, source).stat().st_mtime_ns

    # The source changes (a checkout, an upgrade): the old build no longer counts, even
    # though it is newer than the source on disk.
    source.write_text(source.read_text() + "\n/* changed */\n")
    os.utime(source, (0, 0))
    with pytest.raises(AgentNotBuilt) as info:
        find_agent(out, source)
    assert "stale" in str(info.value) and "make setup" in str(info.value)

    rebuilt = build_agent(out, source)
    assert rebuilt != built and find_agent(out, source) == rebuilt
    assert not built.exists(), "a build removes the builds of other sources"
    assert sorted(p.name for p in out.iterdir()) == [rebuilt.name]


def test_flags_are_part_of_the_build_id(source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = agent_build.build_id(source)
    monkeypatch.setattr(agent_build, "CFLAGS", ("-O0", "-static"))
    assert agent_build.build_id(source) != before


def test_no_compiler_is_a_clear_error(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(AgentBuildError, match=r"gcc is not installed.*apt-get install gcc"):
        build_agent(tmp_path / "bin", source)
    assert not (tmp_path / "bin").exists() or not list((tmp_path / "bin").iterdir())


@needs_gcc
def test_compile_error_leaves_no_binary(tmp_path: Path, source: Path) -> None:
    source.write_text("this is not C\n")
    with pytest.raises(AgentBuildError, match=r"compiling .* failed"):
        build_agent(tmp_path / "bin", source)
    assert list((tmp_path / "bin").iterdir()) == []


def test_missing_source_is_an_incomplete_installation(tmp_path: Path) -> None:
    with pytest.raises(AgentNotBuilt, match="reinstall"):
        find_agent(tmp_path, tmp_path / "bastion-agent.c")


@needs_gcc
def test_setup_step_builds_where_the_server_looks() -> None:
    """``python -m bastion_server.runtime.agent_build`` (what ``make setup`` runs) leaves
    the binary where :func:`find_agent` looks by default; a second run has nothing to do."""
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "bastion_server.runtime.agent_build"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # the second run: already built
    assert find_agent() == binary_path()
