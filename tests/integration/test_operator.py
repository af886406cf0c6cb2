"""The operator's features, against a real `bastion serve` with real sandboxes.

One server for most of them, configured through a TOML config file (which the
command line and the environment override): API keys made at run time and their
scopes, quotas, default and maximum session lifetimes, the env file and a session's
env, the audit log, and `bastion sessions delete --all` / `prune`.  Servers of their
own for the config file's errors and the exit policy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import (
    AuthenticationError,
    Bastion,
    InsufficientScopeError,
    InvalidRequestError,
    JobFailedError,
    QuotaExceededError,
    TerminalConnectionError,
)
from bastion.cli import main as cli_main
from bastion.wire import TerminalCloseCode

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = "operator-admin-key-0123456789"

CONFIG = """\
# Settings of the operator tests: keys with "_" or "-" alike.
api_keys = ["{admin}"]
max-sessions-per-key = 4
max_running_sessions_per_key = 2
max_jobs_per_session = 1
max_jobs_per_key = 1                # the environment says 5 (it wins)
default_idle_timeout = 600
max_idle_timeout = 3600
max_session_lifetime = 7200
env_file = "server.env"             # relative to this file
audit_log = "audit.jsonl"
port = 1                            # the command line's --port wins
pool_size = 1
"""

SERVER_ENV = """\
# the operator's variables, given to every session
FROM_FILE=server
export SHARED="server"
"""


def audit_lines(path: Path) -> list[dict[str, Any]]:
    """The audit log's lines (waiting a little: they are written by a thread)."""
    for _ in range(50):
        if path.exists() and path.read_text().endswith("\n"):
            break
        time.sleep(0.1)
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


def delete_every_tenants_sessions(srv: ServerProcess) -> None:
    """Through an admin key made for each tenant (revoked keys' ones too)."""
    with Bastion(srv.url, ADMIN) as admin:
        tenants = {k["tenant"] for k in admin.keys.list()["keys"]}
        for tenant in tenants:
            made = admin.keys.create("admin", tenant=tenant)
            with Bastion(srv.url, made["api_key"]) as client:
                for s in client.sessions.list()["sessions"]:
                    client.sessions.delete(s["session_id"])
            admin.keys.revoke(made["key_id"])


@pytest.fixture(scope="module")
def ops(data_root: Path) -> Iterator[ServerProcess]:
    home = data_root / "operator"
    home.mkdir()
    home.chmod(0o711)
    (home / "server.env").write_text(SERVER_ENV)
    (home / "bastion.toml").write_text(CONFIG.format(admin=ADMIN))
    srv = ServerProcess(
        home / "data",
        extra_args=("--config", str(home / "bastion.toml")),
        extra_env={"BASTION_MAX_JOBS_PER_KEY": "5"},
    )
    srv.start()
    yield srv
    delete_every_tenants_sessions(srv)
    srv.api_keys = (ADMIN,)
    srv.delete_all_sessions()
    srv.stop()


@pytest.fixture
def admin(ops: ServerProcess) -> Iterator[Bastion]:
    with Bastion(ops.url, ADMIN) as client:
        yield client


@contextlib.contextmanager
def made_key(admin: Bastion, scope: str, **kw: Any) -> Iterator[tuple[Bastion, dict[str, Any]]]:
    """A key made through the API, as a client; its sessions deleted afterwards."""
    made = admin.keys.create(scope, **kw)  # type: ignore[arg-type]
    with Bastion(admin.base_url, made["api_key"]) as client:
        try:
            yield client, dict(made)
        finally:
            if made["scope"] != "viewer":
                for s in client.sessions.list()["sessions"]:
                    client.sessions.delete(s["session_id"])


# --------------------------------------------------------------------------- config file


def test_the_command_line_and_environment_override_the_file(ops: ServerProcess) -> None:
    # The file says port 1; the server answers on --port.  It says max_jobs_per_key=1,
    # the environment 5: two sessions of one key run a job each at once.
    assert httpx.get(ops.url + "/v1/health").status_code == 200
    with Bastion(ops.url, ADMIN) as admin, made_key(admin, "agent") as (agent, _):
        sids = [agent.sessions.create()["session_id"] for _ in range(2)]
        for sid in sids:
            agent.sessions.start(sid)
        jobs = [agent.jobs.run(sid, "sleep 2") for sid in sids]
        for sid, job in zip(sids, jobs, strict=True):
            assert agent.jobs.wait(sid, job["job_id"], timeout=30)["status"] == "completed"


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_an_unknown_key_in_the_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text("port = 9000\nmax_uplaod_bytes = 10\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2
    assert "unknown setting 'max_uplaod_bytes'" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('port = "8080"', "port must be int"),
        ("api_keys = 'one'", "api_keys must be a list of strings"),
        ("on_shutdown = 'explode'", "on_shutdown must be one of keep, stop, delete"),
        ("port = [", "is not valid TOML"),
        ("default_idle_timeout = 100\nmax_idle_timeout = 10", "must not be above"),
    ],
)
def test_a_bad_config_file_is_refused_with_what_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text(text + "\n")
    result = run_serve("--config", str(config))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_the_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text("no-such-setting = 1\n")
    result = run_serve(env={"BASTION_CONFIG": str(config)})
    assert result.returncode == 2 and "'no-such-setting'" in result.stderr


# --------------------------------------------------------------------------- keys, scopes


def test_keys_are_made_listed_and_revoked_and_stored_only_hashed(
    ops: ServerProcess, admin: Bastion
) -> None:
    made = admin.keys.create("agent", name="ci-runner")
    secret = made["api_key"]
    assert secret.startswith("bst_") and made["key_id"].startswith("key_")
    assert made["scope"] == "agent" and made["tenant"] == made["key_id"]
    listed = {k["key_id"]: k for k in admin.keys.list()["keys"]}
    assert listed[made["key_id"]]["name"] == "ci-runner"
    assert "api_key" not in listed[made["key_id"]]
    assert any(k["source"] == "config" and k["scope"] == "admin" for k in listed.values())
    with Bastion(ops.url, secret) as agent:
        assert agent.sessions.list()["sessions"] == []
        # The database holds the key's SHA-256, never the key.
        db = sqlite3.connect(ops.data_dir / "bastion.db")
        stored = db.execute("SELECT hash FROM api_keys WHERE id = ?", (made["key_id"],)).fetchone()
        assert stored == (hashlib.sha256(secret.encode()).hexdigest(),)
        assert secret.encode() not in (ops.data_dir / "bastion.db").read_bytes()
        with pytest.raises(InvalidRequestError):  # names are unique among live keys
            admin.keys.create("viewer", name="ci-runner")
        assert admin.keys.revoke("ci-runner")["revoked_at"] is not None
        with pytest.raises(AuthenticationError):
            agent.sessions.list()
    with pytest.raises(InvalidRequestError, match="configured key"):
        admin.keys.revoke(next(k for k, v in listed.items() if v["source"] == "config"))


def test_an_agent_works_on_its_own_sessions_but_cannot_manage_keys(admin: Bastion) -> None:
    with made_key(admin, "agent") as (agent, _), made_key(admin, "agent") as (other, _):
        sid = agent.sessions.create()["session_id"]
        agent.sessions.start(sid)
        assert agent.jobs.run_and_wait(sid, "echo hi")["output"]["console_output"] == "hi\n"
        with pytest.raises(InsufficientScopeError) as err:
            agent.keys.create("admin")
        assert err.value.status_code == 403 and err.value.code == "insufficient_scope"
        with pytest.raises(InsufficientScopeError):
            agent.keys.list()
        # Another agent's session does not exist for it.
        assert other.sessions.list()["sessions"] == []
        agent.sessions.delete(sid)


def test_a_viewer_reads_its_tenants_sessions_and_changes_nothing(admin: Bastion) -> None:
    with made_key(admin, "agent") as (agent, agent_key):
        sid = agent.sessions.create(metadata={"who": "agent"})["session_id"]
        agent.sessions.start(sid)
        agent.files.upload(sid, b"data", "/home/user/a.txt")
        job = agent.jobs.run_and_wait(sid, "echo from agent")
        with made_key(admin, "viewer", tenant=agent_key["key_id"]) as (viewer, _):
            assert [s["session_id"] for s in viewer.sessions.list()["sessions"]] == [sid]
            assert viewer.sessions.get(sid)["status"] == "running"
            assert viewer.jobs.get(sid, job["job_id"])["output"]["console_output"] == (
                "from agent\n"
            )
            assert viewer.files.download(sid, "/home/user/a.txt") == b"data"
            for attempt in (
                lambda: viewer.sessions.create(),
                lambda: viewer.sessions.stop(sid),
                lambda: viewer.sessions.delete(sid),
                lambda: viewer.jobs.run(sid, "true"),
                lambda: viewer.files.upload(sid, b"x", "/home/user/b.txt"),
                lambda: viewer.files.delete(sid, "/home/user/a.txt"),
                lambda: viewer.keys.list(),
            ):
                with pytest.raises(InsufficientScopeError):
                    attempt()
            with pytest.raises(TerminalConnectionError) as err:
                viewer.terminal.connect(session_id=sid)
            assert err.value.close_code == TerminalCloseCode.FORBIDDEN
            assert err.value.code == "insufficient_scope"
        assert agent.sessions.get(sid)["status"] == "running"
        assert agent.files.download(sid, "/home/user/a.txt") == b"data"


def test_a_key_made_for_a_tenant_rotates_in(ops: ServerProcess, admin: Bastion) -> None:
    old_key = admin.keys.create("agent", name="old")
    with Bastion(ops.url, old_key["api_key"]) as old:
        sid = old.sessions.create()["session_id"]
        with made_key(admin, "agent", tenant=old_key["key_id"]) as (new, new_key):
            assert new_key["tenant"] == old_key["key_id"]
            admin.keys.revoke("old")
            with pytest.raises(AuthenticationError):
                old.sessions.get(sid)
            assert new.sessions.get(sid)["session_id"] == sid
            new.sessions.delete(sid)


# --------------------------------------------------------------------------- quotas


def test_quotas_refuse_with_429_and_leave_nothing_half_made(admin: Bastion) -> None:
    with made_key(admin, "agent") as (agent, _):
        sids = [agent.sessions.create()["session_id"] for _ in range(4)]  # max 4
        with pytest.raises(QuotaExceededError) as err:
            agent.sessions.create()
        assert err.value.status_code == 429 and "max_sessions_per_key" in str(err.value)
        assert len(agent.sessions.list()["sessions"]) == 4
        for sid in sids[:2]:  # max 2 running
            agent.sessions.start(sid)
        with pytest.raises(QuotaExceededError, match="max_running_sessions_per_key"):
            agent.sessions.start(sids[2])
        assert agent.sessions.get(sids[2])["status"] == "created"
        job = agent.jobs.run(sids[0], "sleep 2")  # max 1 per session
        with pytest.raises(QuotaExceededError, match="max_jobs_per_session"):
            agent.jobs.run(sids[0], "echo never")
        assert [j["job_id"] for j in agent.jobs.list(sids[0])["jobs"]] == [job["job_id"]]
        agent.jobs.wait(sids[0], job["job_id"], timeout=30)
        assert agent.jobs.run_and_wait(sids[0], "echo after")["status"] == "completed"
        agent.sessions.stop(sids[1])
        agent.sessions.start(sids[2])  # a place came free
        # Other tenants have quotas of their own.
        with made_key(admin, "agent") as (other, _):
            other.sessions.create()


# --------------------------------------------------------------------------- lifetimes


def test_sessions_get_the_default_idle_timeout_within_the_maxima(admin: Bastion) -> None:
    with made_key(admin, "agent") as (agent, _):
        plain = agent.sessions.create()
        assert plain["idle_timeout"] == 600  # default_idle_timeout
        assert plain["max_lifetime"] == 7200  # no default: the maximum
        own = agent.sessions.create(idle_timeout=30, max_lifetime=60)
        assert (own["idle_timeout"], own["max_lifetime"]) == (30, 60)
        with pytest.raises(InvalidRequestError, match="above the server's maximum") as err:
            agent.sessions.create(idle_timeout=3601)
        assert err.value.code == "limit_exceeded"
        with pytest.raises(InvalidRequestError, match="max_lifetime"):
            agent.sessions.create(max_lifetime=7201)


# --------------------------------------------------------------------------- env


def test_jobs_get_the_env_file_then_the_sessions_env_then_their_own(admin: Bastion) -> None:
    with made_key(admin, "agent") as (agent, _):
        info = agent.sessions.create(env={"SHARED": "session", "SESSION_ONLY": "yes"})
        assert "env" not in info  # secrets are never shown back
        sid = info["session_id"]
        agent.sessions.start(sid)
        script = 'echo "$FROM_FILE $SHARED $SESSION_ONLY"'
        assert agent.jobs.run_and_wait(sid, script)["output"]["console_output"] == (
            "server session yes\n"
        )
        own = agent.jobs.run_and_wait(sid, script, env={"SHARED": "job"})
        assert own["output"]["console_output"] == "server job yes\n"
        # The terminal's shell has them too.
        seen: list[str] = []

        def on_message(message: Any) -> None:
            if message["type"] == "term_output":
                seen.append(str(message["payload"]["data"]))

        with agent.terminal.connect(session_id=sid, on_message=on_message) as term:
            term.exec('echo "T:$SHARED:$FROM_FILE"; exit')
            term.wait(timeout=30)
        assert "T:session:server" in "".join(seen)
        with pytest.raises(InvalidRequestError, match="env"):
            agent.sessions.create(env={"A=B": "x"})


def test_the_async_client_gives_a_session_env(ops: ServerProcess, admin: Bastion) -> None:
    import asyncio

    from bastion import AsyncBastion

    made = admin.keys.create("agent")

    async def scenario() -> str:
        async with AsyncBastion(ops.url, made["api_key"]) as agent:
            sid = (await agent.sessions.create(env={"GREETING": "hello"}))["session_id"]
            await agent.sessions.start(sid)
            try:
                job = await agent.jobs.run_and_wait(sid, "echo $GREETING")
                return job["output"]["console_output"]
            finally:
                await agent.sessions.delete(sid)

    assert asyncio.run(scenario()) == "hello\n"
    admin.keys.revoke(made["key_id"])


# --------------------------------------------------------------------------- audit log


def test_the_audit_log_has_a_line_per_job_and_session_change(
    ops: ServerProcess, admin: Bastion
) -> None:
    log = ops.data_dir.parent / "audit.jsonl"
    assert log.stat().st_mode & 0o777 == 0o600
    with made_key(admin, "agent") as (agent, key):
        sid = agent.sessions.create()["session_id"]
        agent.sessions.start(sid)
        job = agent.jobs.run(sid, ["sh", "-c", "sleep 0.2; exit 3"])
        assert agent.jobs.get(sid, job["job_id"])
        with pytest.raises(JobFailedError):
            agent.jobs.wait(sid, job["job_id"], timeout=30)
        agent.sessions.stop(sid)
        agent.sessions.delete(sid)
    mine = wait_for(
        lambda: (
            [
                line
                for line in audit_lines(log)
                if line.get("session") == sid and line["action"] == "session_delete"
            ]
            and [line for line in audit_lines(log) if line.get("session") == sid]
        )
    )
    actions = [line["action"] for line in mine]
    assert actions == ["session_create", "session_start", "job", "session_stop", "session_delete"]
    for line in mine:
        assert line["key"] == key["key_id"] and line["tenant"] == key["key_id"]
        assert line["time"].endswith("Z")
    (job_line,) = [line for line in mine if line["action"] == "job"]
    assert job_line["job"] == job["job_id"]
    assert job_line["command"] == ["sh", "-c", "sleep 0.2; exit 3"]
    assert job_line["status"] == "failed" and job_line["exit_status"] == 3
    assert job_line["failure_reason"] == "nonzero_exit"
    assert 0.2 <= job_line["duration_seconds"] < 10
    assert {"cpu_seconds", "peak_memory_bytes"} <= set(job_line)
    assert ADMIN not in log.read_text() and key["api_key"] not in log.read_text()
    made_lines = [
        line
        for line in audit_lines(log)
        if line["action"] == "key_create" and line["target"] == key["key_id"]
    ]
    assert made_lines and made_lines[0]["key"] != key["key_id"]  # made by the admin


# --------------------------------------------------------------------------- CLI


def cli(url: str, key: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(["--url", url, "--api-key", key, *args])
    return status, out.getvalue(), err.getvalue()


def test_cli_keys_and_sessions_prune_and_delete_all(ops: ServerProcess, admin: Bastion) -> None:
    status, out, err = cli(ops.url, ADMIN, "keys", "create", "--scope", "agent", "--name", "cli")
    assert status == 0, err
    secret = out.strip()
    assert secret.startswith("bst_") and "shown this once" in err
    status, out, _ = cli(ops.url, ADMIN, "keys", "list")
    assert status == 0 and "cli" in out and secret not in out
    status, _, err = cli(ops.url, secret, "keys", "list")
    assert status == 5 and "insufficient_scope" in err
    with Bastion(ops.url, secret) as agent:
        sids = [agent.sessions.create()["session_id"] for _ in range(3)]
        agent.sessions.start(sids[0])
        agent.sessions.stop(sids[0])
        status, out, _ = cli(ops.url, secret, "sessions", "prune")
        assert status == 0 and out.split() == [sids[0], "deleted"]
        assert {s["session_id"] for s in agent.sessions.list()["sessions"]} == set(sids[1:])
        status, out, _ = cli(ops.url, secret, "--json", "sessions", "delete", "--all")
        assert status == 0 and json.loads(out) == {"deleted": sids[1:]}
        assert agent.sessions.list()["sessions"] == []
        status, _, err = cli(ops.url, secret, "sessions", "delete")
        assert status == 2 and "--all" in err
        status, out, _ = cli(ops.url, secret, "sessions", "create", "--env", "X=from-cli", "-q")
        sid = out.strip()
        agent.sessions.start(sid)
        assert agent.jobs.run_and_wait(sid, "echo $X")["output"]["console_output"] == "from-cli\n"
        agent.sessions.delete(sid)
    status, out, _ = cli(ops.url, ADMIN, "keys", "revoke", "cli")
    assert status == 0 and "revoked" in out


# --------------------------------------------------------------------------- exit policy


@pytest.mark.parametrize("policy", ["stop", "delete"])
def test_the_exit_policy_stops_or_deletes_sessions(
    private_server: ServerProcess, policy: str
) -> None:
    private_server.extra_args = ("--on-shutdown", policy)
    private_server.start()
    with Bastion(private_server.url) as client:
        running = client.sessions.create()["session_id"]
        client.sessions.start(running)
        created = client.sessions.create()["session_id"]
    assert private_server.stop() == 0
    private_server.extra_args = ()
    private_server.start()  # keep: the default
    with Bastion(private_server.url) as client:
        listed = {s["session_id"]: s for s in client.sessions.list()["sessions"]}
        if policy == "delete":
            assert listed == {}
        else:
            assert listed[running]["status"] == "stopped"
            assert "on_shutdown = stop" in (listed[running]["status_reason"] or "")
            assert listed[created]["status"] == "created"
        sandboxes = list((private_server.data_dir / "sessions").glob("ses_*"))
        if policy == "delete":
            assert sandboxes == []


def test_by_default_sessions_keep_running_across_a_restart(private_server: ServerProcess) -> None:
    private_server.start()
    with Bastion(private_server.url) as client:
        sid = client.sessions.create()["session_id"]
        client.sessions.start(sid)
    assert private_server.stop() == 0
    private_server.start()
    with Bastion(private_server.url) as client:
        assert client.sessions.get(sid)["status"] == "running"
        client.sessions.delete(sid)
