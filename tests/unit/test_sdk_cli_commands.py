"""``bastion sessions|files|jobs`` against an in-memory fake of the /v1 API."""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bastion.cli import ExitCode, main
from bastion.cli import progress as cli_progress

URL = "http://bastion.test"
T0 = "2024-05-01T10:00:00.000000Z"
T1 = "2024-05-01T10:00:01.500000Z"


def api_error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class FakeServer:
    """Enough of the Bastion API for the CLI: sessions, files in memory, and jobs whose
    outcome is decided by their command (``exit N``, ``sleep``, anything else echoes)."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.files: dict[tuple[str, str], bytes] = {}
        self.dirs: set[tuple[str, str]] = set()
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.break_download_after: int | None = None

    # ------------------------------------------------------------------ fixtures

    def add_session(self, sid: str = "s1", status: str = "running", **extra: Any) -> str:
        self.sessions[sid] = {
            "session_id": sid,
            "status": status,
            "created_at": T0,
            "updated_at": T0,
            "limits": {"memory_mb": 512, "pids": 256, "cpus": 1.0, "disk_mb": 1024},
            "metadata": {},
            "idle_timeout": None,
            "max_lifetime": None,
            "on_timeout": "stop",
            "network": {"enabled": False, "allow": []},
            "status_reason": None,
            **extra,
        }
        self.dirs.update({(sid, "/"), (sid, "/home"), (sid, "/home/user"), (sid, "/tmp")})
        return sid

    def add_job(self, command: list[str], sid: str = "s1") -> dict[str, Any]:
        jid = f"j{len(self.jobs) + 1}"
        job: dict[str, Any] = {
            "job_id": jid,
            "session_id": sid,
            "status": "queued",
            "command": command,
            "output": None,
            "created_at": T0,
            "started_at": None,
            "finished_at": None,
            "failure_reason": None,
        }
        self.jobs[jid] = job
        if command[:1] == ["sleep"]:
            job.update(status="running", started_at=T0)
            return job
        status = int(command[1]) if command[:1] == ["exit"] else 0
        stdout = " ".join(command[1:]) + "\n" if command[:1] == ["echo"] else "out\n"
        job.update(
            status="completed" if status == 0 else "failed",
            started_at=T0,
            finished_at=T1,
            failure_reason=None if status == 0 else "nonzero_exit",
            output={"console_output": stdout, "errout": "err\n", "status_code": status},
        )
        return job

    def last(self, method: str | None = None) -> httpx.Request:
        requests = [r for r in self.requests if method is None or r.method == method]
        return requests[-1]

    # ------------------------------------------------------------------ routing

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        parts = request.url.path.split("/")[2:]  # after /v1
        if parts == ["sessions"]:
            if request.method == "POST":
                return self._create(json.loads(request.content))
            return httpx.Response(200, json={"sessions": list(self.sessions.values())})
        sid = parts[1]
        session = self.sessions.get(sid)
        if session is None:
            return api_error(404, "session_not_found", f"session {sid!r} not found")
        rest = parts[2:]
        if not rest:
            if request.method == "DELETE":
                session["status"] = "deleted"
                return httpx.Response(200, json=session)
            return httpx.Response(200, json=self._with_usage(session))
        if rest in (["start"], ["stop"]):
            if session["status"] == "deleted":
                return api_error(409, "session_state", f"session {sid} is deleted")
            session["status"] = "running" if rest == ["start"] else "stopped"
            return httpx.Response(200, json=session)
        if session["status"] != "running":
            return api_error(409, "session_state", f"session {sid} is {session['status']}")
        if rest[0] == "files":
            return self._files(request, sid, rest[1:])
        return self._jobs(request, sid, rest[1:])

    def _create(self, body: dict[str, Any]) -> httpx.Response:
        sid = self.add_session(f"s{len(self.sessions) + 1}", status="created")
        session = self.sessions[sid]
        session["limits"] = {**session["limits"], **body.get("limits", {})}
        session["metadata"] = body.get("metadata", {})
        for key in ("idle_timeout", "max_lifetime", "on_timeout"):
            if key in body:
                session[key] = body[key]
        if "network" in body:
            session["network"] = {"allow": [], **body["network"]}
        return httpx.Response(201, json=session)

    @staticmethod
    def _with_usage(session: dict[str, Any]) -> dict[str, Any]:
        if session["status"] != "running":
            return session
        usage = {
            "cpu_seconds": 1.25,
            "memory_bytes": 3 * 1024 * 1024,
            "processes": 2,
            "disk_bytes": 4096,
        }
        return {**session, "usage": usage}

    def _files(self, request: httpx.Request, sid: str, rest: list[str]) -> httpx.Response:
        path = request.url.params["path"]
        key = (sid, path)
        if rest == ["content"]:
            if key in self.dirs:
                return api_error(409, "is_a_directory", f"is a directory: {path}")
            if key not in self.files:
                return api_error(404, "file_not_found", f"no such file or directory: {path}")
            data = self.files[key]
            if self.break_download_after is not None:
                cut = self.break_download_after

                def broken() -> Iterator[bytes]:
                    yield data[:cut]
                    raise httpx.ReadError("connection reset")

                return httpx.Response(200, content=broken())
            return httpx.Response(200, content=data)
        if request.method == "PUT":
            if key in self.dirs:
                return api_error(409, "is_a_directory", f"is a directory: {path}")
            self.files[key] = request.content
            return httpx.Response(200, json={"path": path, "size": len(request.content)})
        if request.method == "DELETE":
            if key in self.dirs:
                inside = [p for (s, p) in self.files if s == sid and p.startswith(path + "/")]
                if inside and request.url.params.get("recursive") != "true":
                    return api_error(
                        409,
                        "directory_not_empty",
                        f"directory not empty (delete it with recursive=true): {path}",
                    )
                for p in inside:
                    del self.files[(sid, p)]
                self.dirs.discard(key)
            elif self.files.pop(key, None) is None:
                return api_error(404, "file_not_found", f"no such file or directory: {path}")
            return httpx.Response(200, json={"path": path, "deleted": True})
        if key in self.files:
            return api_error(409, "not_a_directory", f"not a directory: {path}")
        if key not in self.dirs:
            return api_error(404, "file_not_found", f"no such file or directory: {path}")
        entries = []
        prefix = path.rstrip("/") + "/"
        for (s, p), data in sorted(self.files.items()):
            if s == sid and p.startswith(prefix) and "/" not in p[len(prefix) :]:
                entries.append(
                    {
                        "name": p[len(prefix) :],
                        "path": p,
                        "size": len(data),
                        "type": "file",
                        "modified_at": T0,
                        "mode": "-rw-r--r--",
                    }
                )
        for s, p in sorted(self.dirs):
            if s == sid and p != path and p.startswith(prefix) and "/" not in p[len(prefix) :]:
                entries.append(
                    {
                        "name": p[len(prefix) :],
                        "path": p,
                        "size": 4096,
                        "type": "directory",
                        "modified_at": T0,
                        "mode": "drwxr-xr-x",
                    }
                )
        return httpx.Response(200, json={"path": path, "files": entries})

    def _jobs(self, request: httpx.Request, sid: str, rest: list[str]) -> httpx.Response:
        if not rest:
            if request.method == "POST":
                body = json.loads(request.content)
                job = self.add_job(body["command"], sid)
                return httpx.Response(202, json={**job, "status": "queued", "output": None})
            jobs = [{**j, "output": None} for j in self.jobs.values() if j["session_id"] == sid]
            return httpx.Response(200, json={"jobs": jobs})
        found = self.jobs.get(rest[0])
        if found is None:
            return api_error(404, "job_not_found", f"job {rest[0]!r} not found")
        if rest[1:] == ["events"]:
            return httpx.Response(200, content=self._events(found))
        return httpx.Response(200, json=found)

    @staticmethod
    def _events(job: dict[str, Any]) -> Iterator[bytes]:
        def line(event: dict[str, Any]) -> bytes:
            return json.dumps(event).encode() + b"\n"

        yield line({"type": "status", "status": "running"})
        if job["status"] == "running":
            yield line({"type": "stdout", "data": "so far\n"})
            return  # the stream stays open on a real server; here it just ends
        yield line({"type": "stdout", "data": job["output"]["console_output"]})
        yield line({"type": "stderr", "data": job["output"]["errout"]})
        yield line({"type": "stdout", "data": "more\n"})
        yield line({"type": "status", "status": job["status"]})
        yield line({"type": "end", "job": job})


@pytest.fixture
def server() -> FakeServer:
    srv = FakeServer()
    srv.add_session("s1")
    return srv


def cli(server: FakeServer, *argv: str) -> int:
    return main(["--url", URL, *argv], transport=httpx.MockTransport(server), commands=[])


def out_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().out.splitlines()


# --------------------------------------------------------------------------- sessions


def test_sessions_create_sends_every_option(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli(
        server,
        "sessions",
        "create",
        "--memory-mb",
        "256",
        "--pids",
        "64",
        "--cpus",
        "0.5",
        "--disk-mb",
        "512",
        "--idle-timeout",
        "10m",
        "--max-lifetime",
        "1h30m",
        "--on-timeout",
        "delete",
        "--allow",
        "10.0.0.0/8",
        "pypi.org",
        "--allow",
        "203.0.113.0/24",
        "--metadata",
        "user=alice",
        "--metadata",
        "task=a=b",
    )
    assert code == 0
    assert json.loads(server.last("POST").content) == {
        "limits": {"memory_mb": 256, "pids": 64, "cpus": 0.5, "disk_mb": 512},
        "metadata": {"user": "alice", "task": "a=b"},
        "idle_timeout": 600.0,
        "max_lifetime": 5400.0,
        "on_timeout": "delete",
        "network": {"enabled": True, "allow": ["10.0.0.0/8", "pypi.org", "203.0.113.0/24"]},
    }
    out = capsys.readouterr().out
    assert "session   s2\nstatus    created\n" in out
    assert "limits    memory 256 MiB, 64 processes, 0.5 CPU, disk 512 MiB\n" in out
    assert "timeouts  idle 10m, lifetime 1h30m, then delete\n" in out
    assert "network   on, to 10.0.0.0/8, pypi.org, 203.0.113.0/24\n" in out
    assert "metadata  user=alice, task=a=b\n" in out


def test_sessions_create_minimal_and_network_flag(server: FakeServer) -> None:
    assert cli(server, "sessions", "create", "-q") == 0
    assert json.loads(server.last("POST").content) == {}
    assert cli(server, "sessions", "create", "--network", "-q") == 0
    assert json.loads(server.last("POST").content) == {"network": {"enabled": True}}


def test_sessions_create_start_quiet(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "sessions", "create", "--start", "-q") == 0
    assert capsys.readouterr().out == "s2\n"
    assert server.last().url.path == "/v1/sessions/s2/start"
    assert server.sessions["s2"]["status"] == "running"


def test_sessions_create_json(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, "sessions", "create", "--start", "--json", "-q") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["session_id"] == "s2" and info["status"] == "running"


def test_sessions_create_start_failure_names_the_session(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/start"):
            return api_error(500, "session_start_failed", "crun said no")
        return server(request)

    code = main(
        ["--url", URL, "sessions", "create", "--start"],
        transport=httpx.MockTransport(handler),
        commands=[],
    )
    assert code == ExitCode.FAILED
    assert capsys.readouterr().err == (
        "bastion: session s2 was created but not started\n"
        "bastion: crun said no (session_start_failed)\n"
    )


def test_sessions_list_table(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_session("s-long-identifier", status="stopped", metadata={"user": "bob"})
    server.sessions["s-long-identifier"]["limits"] = {"memory_mb": 2048, "pids": 32, "cpus": 2.5}
    server.sessions["s-long-identifier"]["network"] = {"enabled": True, "allow": []}
    assert cli(server, "sessions", "list") == 0
    lines = out_lines(capsys)
    assert lines[0].split() == [
        "SESSION",
        "STATUS",
        "CREATED",
        "MEMORY",
        "PIDS",
        "CPUS",
        "NETWORK",
        "METADATA",
    ]
    assert lines[1].split() == ["s1", "running", "2024-05-01", "512", "MiB", "256", "1", "off", "-"]
    assert lines[2].split()[:2] == ["s-long-identifier", "stopped"]
    assert lines[2].endswith("2.0 GiB    32   2.5  on       user=bob")
    # Aligned: every column starts at the same offset on every line.
    for header in ("STATUS", "CREATED", "NETWORK", "METADATA"):
        start = lines[0].index(header)
        assert all(line[start - 2 : start] == "  " for line in lines)
    # Right-aligned numbers end where their header ends.
    end = lines[0].index("MEMORY") + len("MEMORY")
    assert lines[1][:end].endswith("512 MiB") and lines[2][:end].endswith("2.0 GiB")


def test_sessions_list_filters_and_formats(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.add_session("s2", status="stopped")
    assert cli(server, "sessions", "list", "-q") == 0
    assert out_lines(capsys) == ["s1", "s2"]
    assert cli(server, "sessions", "list", "--status", "stopped", "-q") == 0
    assert out_lines(capsys) == ["s2"]
    assert cli(server, "sessions", "list", "--status", "stopped", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [s["session_id"] for s in listed["sessions"]] == ["s2"]
    assert cli(server, "sessions", "list", "--status", "deleted") == 0
    assert capsys.readouterr() == ("", "no sessions\n")


def test_sessions_list_shows_the_node_column_when_sessions_are_on_several_nodes(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    # A cluster gateway (serve --ray) reports each session's node; one without (made
    # by an older server, say) shows "-".
    server.sessions["s1"]["node"] = "node-b7f3"
    server.add_session("s2", status="stopped", node=None)
    server.add_session("s3", status="stopped", node="node-c214")
    assert cli(server, "sessions", "list") == 0
    lines = out_lines(capsys)
    header = lines[0].split()
    assert header[:3] == ["SESSION", "STATUS", "NODE"]
    assert header[3:] == ["CREATED", "MEMORY", "PIDS", "CPUS", "NETWORK", "METADATA"]
    assert lines[1].split()[:4] == ["s1", "running", "node-b7f3", "2024-05-01"]
    assert lines[2].split()[:4] == ["s2", "stopped", "-", "2024-05-01"]
    assert lines[3].split()[:4] == ["s3", "stopped", "node-c214", "2024-05-01"]
    start = lines[0].index("NODE")
    assert lines[1][start:].startswith("node-b7f3") and lines[2][start:].startswith("- ")
    # Every session on the one node of a server of one machine (or none named): the
    # column would say the same on every line, so there is none.
    for node in ("host-1", None):
        for session in server.sessions.values():
            session["node"] = node
        assert cli(server, "sessions", "list") == 0
        assert out_lines(capsys)[0].split()[:3] == ["SESSION", "STATUS", "CREATED"]


def test_sessions_status_shows_the_node(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "sessions", "status", "s1") == 0
    assert "node" not in [line.split()[0] for line in out_lines(capsys)]
    server.sessions["s1"]["node"] = "node-b7f3"
    assert cli(server, "sessions", "status", "s1") == 0
    lines = out_lines(capsys)
    assert lines[1:3] == ["status    running", "node      node-b7f3"]


def test_sessions_status_shows_usage(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "sessions", "status", "s1") == 0
    out = capsys.readouterr().out
    assert "usage     cpu 1.25s, memory 3.0 MiB, 2 processes, disk 4.0 KiB\n" in out
    assert cli(server, "sessions", "status", "s1", "--json") == 0
    assert json.loads(capsys.readouterr().out)["usage"]["processes"] == 2


@pytest.mark.parametrize(("action", "status"), [("stop", "stopped"), ("delete", "deleted")])
def test_session_actions(
    server: FakeServer, action: str, status: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "sessions", action, "s1") == 0
    assert capsys.readouterr().out == f"s1  {status}\n"
    assert cli(server, "sessions", "start", "s1", "--json") == (
        ExitCode.OK if action == "stop" else ExitCode.CONFLICT
    )


def test_session_not_found(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, "sessions", "delete", "nope") == 3  # ExitCode.NOT_FOUND
    assert capsys.readouterr().err == "bastion: session 'nope' not found (session_not_found)\n"


# --------------------------------------------------------------------------- files


def test_upload_file(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "hello.py"
    local.write_bytes(b'print("hi")\n')
    assert cli(server, "files", "upload", str(local), "s1:/home/user/main.py") == 0
    assert server.files[("s1", "/home/user/main.py")] == b'print("hi")\n'
    assert capsys.readouterr() == (f"uploaded {local} -> s1:/home/user/main.py (12 B)\n", "")


@pytest.mark.parametrize("dest", ["s1:/home/user/", "s1:/home/user"])
def test_upload_into_a_directory_keeps_the_name(
    server: FakeServer, tmp_path: Path, dest: str
) -> None:
    local = tmp_path / "data.csv"
    local.write_bytes(b"a,b\n")
    assert cli(server, "files", "upload", str(local), dest) == 0
    assert server.files[("s1", "/home/user/data.csv")] == b"a,b\n"


def test_upload_stdin(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00binary\xff")))
    assert cli(server, "files", "upload", "-", "s1:/tmp/in.bin", "--json") == 0
    assert server.files[("s1", "/tmp/in.bin")] == b"\x00binary\xff"
    assert json.loads(capsys.readouterr().out) == {"path": "/tmp/in.bin", "size": 8}


def test_upload_stdin_needs_a_name(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, "files", "upload", "-", "s1:/tmp/") == ExitCode.USAGE
    assert capsys.readouterr().err.endswith("(usage)\n")


def test_upload_local_errors(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.txt"
    assert cli(server, "files", "upload", str(missing), "s1:/tmp/x") == ExitCode.NOT_FOUND
    assert capsys.readouterr().err == f"bastion: {missing}: No such file or directory (ENOENT)\n"
    assert cli(server, "files", "upload", str(tmp_path), "s1:/tmp/x") == ExitCode.CONFLICT
    assert "(EISDIR)" in capsys.readouterr().err
    assert not server.files


def test_upload_session_not_running(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.sessions["s1"]["status"] = "stopped"
    local = tmp_path / "f"
    local.write_bytes(b"x")
    assert cli(server, "files", "upload", str(local), "s1:/tmp/f") == ExitCode.CONFLICT
    assert capsys.readouterr().err == "bastion: session s1 is stopped (session_state)\n"


def test_download_to_a_file_a_directory_and_stdout(
    server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.files[("s1", "/tmp/out.bin")] = b"\x00\x01result"
    dest = tmp_path / "copy.bin"
    assert cli(server, "files", "download", "s1:/tmp/out.bin", str(dest)) == 0
    assert dest.read_bytes() == b"\x00\x01result"
    assert capsys.readouterr().out == f"downloaded s1:/tmp/out.bin -> {dest} (8 B)\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~_umask()

    assert cli(server, "files", "download", "s1:/tmp/out.bin", str(tmp_path), "--json") == 0
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\x01result"
    assert json.loads(capsys.readouterr().out) == {
        "path": "/tmp/out.bin",
        "size": 8,
        "local_path": str(tmp_path / "out.bin"),
    }

    monkeypatch.chdir(tmp_path / "..")
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    assert cli(server, "files", "download", "s1:/tmp/out.bin") == 0
    assert (sub / "out.bin").read_bytes() == b"\x00\x01result"
    capsys.readouterr()

    buffer = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(buffer))
    assert cli(server, "files", "download", "s1:/tmp/out.bin", "-") == 0
    assert buffer.getvalue() == b"\x00\x01result"  # the bytes alone, no summary


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_failed_download_leaves_the_existing_file(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "keep.txt"
    dest.write_bytes(b"precious")
    dest.chmod(0o600)
    assert cli(server, "files", "download", "s1:/tmp/missing", str(dest)) == ExitCode.NOT_FOUND
    assert capsys.readouterr().err == (
        "bastion: no such file or directory: /tmp/missing (file_not_found)\n"
    )
    server.files[("s1", "/tmp/big")] = b"x" * 100
    server.break_download_after = 10
    assert cli(server, "files", "download", "s1:/tmp/big", str(dest)) == ExitCode.CONNECTION
    assert dest.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]  # no temporary left
    server.break_download_after = None
    assert cli(server, "files", "download", "s1:/tmp/big", str(dest)) == 0
    assert dest.read_bytes() == b"x" * 100
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600  # the file's mode is kept


def test_download_a_directory_is_a_conflict(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(server, "files", "download", "s1:/home/user", str(tmp_path)) == ExitCode.CONFLICT
    assert capsys.readouterr().err == "bastion: is a directory: /home/user (is_a_directory)\n"


def test_files_list(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.files[("s1", "/home/user/b.txt")] = b"x" * 1536
    server.files[("s1", "/home/user/a.py")] = b"print()\n"
    server.dirs.add(("s1", "/home/user/data"))
    assert cli(server, "files", "list", "s1:/home/user") == 0
    assert out_lines(capsys) == [
        "MODE           SIZE  MODIFIED    NAME",
        "-rw-r--r--      8 B  2024-05-01  a.py",
        "-rw-r--r--  1.5 KiB  2024-05-01  b.txt",
        "drwxr-xr-x  4.0 KiB  2024-05-01  data/",
    ]
    assert cli(server, "files", "list", "s1", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["path"] == "/" and {"home", "tmp"} <= {f["name"] for f in listing["files"]}
    assert cli(server, "files", "list", "s1:/nowhere") == ExitCode.NOT_FOUND


def test_files_delete(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.files[("s1", "/home/user/build/out.o")] = b"o"
    server.dirs.add(("s1", "/home/user/build"))
    assert cli(server, "files", "delete", "s1:/home/user/build") == ExitCode.CONFLICT
    assert capsys.readouterr().err == (
        "bastion: s1:/home/user/build: directory not empty (delete it with -r) "
        "(directory_not_empty)\n"
    )
    assert cli(server, "files", "delete", "-r", "s1:/home/user/build") == 0
    assert capsys.readouterr().out == "deleted s1:/home/user/build\n"
    assert server.last().url.params["recursive"] == "true"
    assert cli(server, "files", "delete", "s1:/home/user/build", "--json") == ExitCode.NOT_FOUND


# --------------------------------------------------------------------------- jobs


def test_jobs_run_prints_the_output(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(
        server, "jobs", "run", "s1", "--env", "A=1", "--cwd", "/w", "--timeout", "5s", "--",
        "echo", "hello", "world",
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr() == ("hello world\n", "err\n")
    assert json.loads(server.last("POST").content) == {
        "command": ["echo", "hello", "world"],
        "env": {"A": "1"},
        "cwd": "/w",
        "timeout": 5.0,
    }


def test_jobs_run_failed(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(server, "jobs", "run", "s1", "--", "exit", "3") == 1  # ExitCode.FAILED
    out, err = capsys.readouterr()
    assert out == "out\n"
    assert err == "err\nbastion: job j1 failed with exit status 3 (nonzero_exit)\n"
    assert cli(server, "jobs", "run", "s1", "--json", "--", "exit", "4") == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["output"]["status_code"] == 4
    assert err == "bastion: job j2 failed with exit status 4 (nonzero_exit)\n"


def test_jobs_run_shell_and_no_wait(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli(server, "jobs", "run", "s1", "--no-wait", "-q", "--shell", "--", "ls", "|", "wc") == 0
    )
    assert capsys.readouterr().out == "j1\n"
    assert json.loads(server.last("POST").content) == {"command": ["/bin/sh", "-c", "ls | wc"]}
    assert not [r for r in server.requests if r.url.path.endswith("/wait")]
    assert cli(server, "jobs", "run", "s1", "--no-wait", "--", "sleep", "9") == 0
    assert "status       queued\n" in capsys.readouterr().out


def test_jobs_run_wait_timeout(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli(server, "jobs", "run", "s1", "--wait-timeout", "0.2", "--", "sleep", "9")
    assert code == 7  # ExitCode.TIMEOUT
    err = capsys.readouterr().err
    assert err.startswith("bastion: job j1 still running after 0.2 s") and err.endswith(
        "(timeout)\n"
    )


def test_jobs_run_session_not_running(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.sessions["s1"]["status"] = "created"
    assert cli(server, "jobs", "run", "s1", "--", "true") == ExitCode.CONFLICT


def test_jobs_list_get_wait(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_job(["echo", "one"])
    server.add_job(["exit", "2"])
    server.add_job(["sleep", "100"])
    assert cli(server, "jobs", "list", "s1") == 0
    lines = out_lines(capsys)
    assert lines[0].split() == ["JOB", "STATUS", "CREATED", "DURATION", "COMMAND"]
    assert lines[1].split() == ["j1", "completed", "2024-05-01", "1.5s", "echo", "one"]
    assert lines[2].split() == ["j2", "failed", "2024-05-01", "1.5s", "exit", "2"]
    assert lines[3].split()[:3] == ["j3", "running", "2024-05-01"]
    assert cli(server, "jobs", "list", "s1", "-q") == 0
    assert out_lines(capsys) == ["j1", "j2", "j3"]
    assert cli(server, "jobs", "list", "s1", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)["jobs"]) == 3

    assert cli(server, "jobs", "get", "s1", "j2") == 0
    out = capsys.readouterr().out
    assert "status       failed (nonzero_exit)\nexit status  2\ncommand      exit 2\n" in out
    assert "duration     1.5s\nstdout       4 B\nstderr       4 B\n" in out

    assert cli(server, "jobs", "wait", "s1", "j1") == 0
    assert "status       completed\n" in capsys.readouterr().out
    assert cli(server, "jobs", "wait", "s1", "j2", "--json") == ExitCode.FAILED
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "failed"
    assert err == "bastion: job j2 failed with exit status 2 (nonzero_exit)\n"
    assert cli(server, "jobs", "wait", "s1", "j3", "--timeout", "0.1") == ExitCode.TIMEOUT
    assert cli(server, "jobs", "get", "s1", "j9") == ExitCode.NOT_FOUND
    assert capsys.readouterr().err.endswith("(job_not_found)\n")


def test_jobs_logs(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_job(["echo", "hi"])
    assert cli(server, "jobs", "logs", "s1", "j1") == 0
    assert capsys.readouterr() == ("hi\nmore\n", "err\n")
    assert cli(server, "jobs", "logs", "s1", "j1", "--json") == 0
    events = [json.loads(line) for line in out_lines(capsys)]
    assert [e["type"] for e in events] == ["status", "stdout", "stderr", "stdout", "status", "end"]
    assert events[-1]["job"]["job_id"] == "j1"


def test_jobs_logs_of_a_running_job(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.add_job(["sleep", "100"])
    # Without -f: the output so far.
    assert cli(server, "jobs", "logs", "s1", "j1") == 0
    assert capsys.readouterr().out == "so far\n"
    # With -f a stream that ends without the job's end is a broken connection.
    assert cli(server, "jobs", "logs", "-f", "s1", "j1") == ExitCode.CONNECTION
    out, err = capsys.readouterr()
    assert out == "so far\n" and err.endswith("(connection_error)\n")


# --------------------------------------------------------------------------- progress


class TtyStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_tty_for_large_transfers(
    server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_progress, "MIN_BYTES", 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 10)

    def stderr_of(*argv: str) -> str:
        tty = TtyStream()
        monkeypatch.setattr(sys, "stderr", tty)
        assert cli(server, *argv) == 0
        return tty.getvalue()

    drawn = stderr_of("files", "upload", str(big), "s1:/tmp/big.bin")
    assert "\r" in drawn and "100%" in drawn and "3.0 MiB/3.0 MiB" in drawn
    assert drawn.endswith("\n")
    assert stderr_of("files", "upload", str(small), "s1:/tmp/small.bin") == ""
    assert stderr_of("files", "upload", str(big), "s1:/tmp/b2", "--json") == ""
    assert stderr_of("files", "upload", str(big), "s1:/tmp/b3", "--no-progress") == ""
    down = stderr_of("files", "download", "s1:/tmp/big.bin", str(tmp_path / "copy"))
    assert "100%" in down and "3.0 MiB/3.0 MiB" in down
    assert (tmp_path / "copy").read_bytes() == big.read_bytes()


def test_no_progress_bar_without_a_tty(
    server: FakeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(cli_progress, "MIN_BYTES", 1)
    big = tmp_path / "big.bin"
    big.write_bytes(b"y" * 100_000)
    assert cli(server, "files", "upload", str(big), "s1:/tmp/big.bin") == 0
    assert capsys.readouterr().err == ""
