"""`bastion sessions pause|resume|snapshot|fork|restore` and `bastion snapshots` against
a real server."""

from __future__ import annotations

import json

import pytest
from tests.conftest import ServerProcess
from tests.integration.test_cli import bastion, error_line

from bastion import Bastion

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _out(result: object) -> str:
    assert result.returncode == 0, result.stderr.decode()  # type: ignore[attr-defined]
    return result.stdout.decode()  # type: ignore[attr-defined,no-any-return]


def test_cli_pause_snapshot_fork_restore(server: ServerProcess) -> None:
    with Bastion(server.url) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
        client.jobs.run_and_wait(sid, ["sh", "-c", "echo clean > ~/state"])
        made: list[str] = [sid]
        try:
            assert _out(bastion(server, "sessions", "pause", sid)) == f"{sid}  paused\n"
            refused = bastion(server, "exec", sid, "--", "true")
            assert refused.returncode == 125 and "(session_paused)" in error_line(refused)
            assert _out(bastion(server, "sessions", "resume", sid)) == f"{sid}  running\n"

            snap = _out(bastion(server, "sessions", "snapshot", sid, "--name", "s1", "-q")).strip()
            assert snap.startswith("snap_")
            shown = json.loads(_out(bastion(server, "snapshots", "get", snap, "--json")))
            assert shown["status"] == "ready" and shown["name"] == "s1"
            assert snap in _out(bastion(server, "snapshots", "list", "-q")).split()

            copy = _out(
                bastion(server, "sessions", "create", "--snapshot", snap, "--start", "-q")
            ).strip()
            made.append(copy)
            assert (
                client.jobs.run_and_wait(copy, ["cat", "/home/user/state"])["output"][  # type: ignore[index]
                    "console_output"
                ]
                == "clean\n"
            )

            forked = bastion(server, "sessions", "fork", sid, "2")
            copies = _out(forked).split()
            made.extend(copies)
            assert len(copies) == 2 and "snapshot snap_" in forked.stderr.decode()

            client.jobs.run_and_wait(sid, ["sh", "-c", "echo dirty > ~/state"])
            assert "running" in _out(bastion(server, "sessions", "restore", sid, snap))
            restored = client.jobs.run_and_wait(sid, ["cat", "/home/user/state"])["output"]
            assert restored is not None and restored["console_output"] == "clean\n"

            gone = bastion(server, "snapshots", "get", "snap_nosuchsnapshot")
            assert gone.returncode == 3 and "(snapshot_not_found)" in error_line(gone)
        finally:
            for session_id in made:
                client.sessions.delete(session_id)
            for s in client.snapshots.list()["snapshots"]:
                bastion(server, "snapshots", "delete", s["snapshot_id"])
