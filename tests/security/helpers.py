"""Helpers shared by the security tests: jobs run in a session, and session pools."""

from __future__ import annotations

from typing import Any, Literal

import httpx
import pytest

from bastion import Bastion, JobFailedError, SessionLimits, SessionStateError

#: Whom a job runs as: the sandbox user, or root of the session's user namespace.
User = Literal["user", "root"]


def run_status(
    client: Bastion,
    sid: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    user: User | None = None,
) -> tuple[int | None, str, str]:
    """Run ``argv`` in the session (as ``user``); (exit status, stdout, stderr), failed
    or not."""
    try:
        result = client.jobs.run_and_wait(
            sid, argv, env=env, timeout=timeout, wait_timeout=120, user=user
        )
    except JobFailedError as exc:
        return exc.status_code, exc.console_output, exc.errout
    output = result["output"]
    assert output is not None
    return output["status_code"], output["console_output"], output["errout"]


def run_ok(
    client: Bastion,
    sid: str,
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    user: User | None = None,
) -> str:
    """Run ``argv`` in the session (as ``user``); its stdout.  A failed job fails the
    test."""
    try:
        result = client.jobs.run_and_wait(
            sid, argv, env=env, timeout=timeout, wait_timeout=120, user=user
        )
    except JobFailedError as exc:
        pytest.fail(
            f"job {argv!r} failed ({exc.status_code}, {exc.failure_reason}): "
            f"stdout={exc.console_output[-2000:]!r} stderr={exc.errout[-2000:]!r}"
        )
    output = result["output"]
    assert output is not None
    if output["status_code"] != 0:
        pytest.fail(
            f"job {argv!r} failed ({output['status_code']}): "
            f"stdout={output['console_output'][-2000:]!r} stderr={output['errout'][-2000:]!r}"
        )
    return output["console_output"]


def sh(
    client: Bastion,
    sid: str,
    script: str,
    env: dict[str, str] | None = None,
    user: User | None = None,
) -> str:
    """Stdout of ``sh -c script`` in the session (a failure fails the test)."""
    return run_ok(client, sid, ["sh", "-c", script], env, user=user)


def sh_status(
    client: Bastion,
    sid: str,
    script: str,
    env: dict[str, str] | None = None,
    user: User | None = None,
) -> tuple[int | None, str, str]:
    return run_status(client, sid, ["sh", "-c", script], env, user=user)


def py(
    client: Bastion,
    sid: str,
    code: str,
    timeout: float | None = None,
    user: User | None = None,
) -> str:
    """Stdout of a python3 program run in the session (a failure fails the test)."""
    return run_ok(client, sid, ["python3", "-c", code], timeout=timeout, user=user)


def pid_holder(seconds: int) -> str:
    """A python3 program that forks until no pid is left, prints how many children it
    made, and then holds them all (and itself) for ``seconds``."""
    return f"""
import os, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep({seconds})
        os._exit(0)
    n += 1
print(n, flush=True)
time.sleep({seconds})
"""


class Sessions:
    """Creates started sessions and deletes every one of them at teardown.

    With ``gone_ok``, a session that is gone already at teardown (deleted by its
    lifetime: the delete raises ``SessionStateError``) is no error.
    """

    def __init__(self, client: Bastion, *, gone_ok: bool = False) -> None:
        self.client = client
        self.gone_ok = gone_ok
        self.ids: list[str] = []

    def new(
        self,
        limits: SessionLimits | None = None,
        *,
        start: bool = True,
        **expiry: Any,
    ) -> str:
        """A new session; ``expiry`` takes ``idle_timeout``, ``max_lifetime``, ``on_timeout``."""
        if expiry:
            # Sent as the wire's CreateSessionRequest: not every SDK version takes these
            # as keyword arguments of sessions.create().
            body: dict[str, Any] = dict(expiry)
            if limits is not None:
                body["limits"] = dict(limits)
            response = httpx.post(
                f"{self.client.base_url}/v1/sessions",
                json=body,
                headers={"Authorization": f"Bearer {self.client.api_key}"}
                if self.client.api_key
                else {},
                timeout=30,
            )
            assert response.status_code == 201, response.text
            sid = str(response.json()["session_id"])
        else:
            sid = self.client.sessions.create(limits=limits)["session_id"]
        self.ids.append(sid)
        if start:
            self.client.sessions.start(sid)
        return sid

    def delete_all(self) -> None:
        errors = []
        for sid in self.ids:
            try:
                self.client.sessions.delete(sid)
            except SessionStateError as exc:
                if not self.gone_ok:
                    errors.append(f"{sid}: {exc!r}")
            except Exception as exc:  # keep deleting the others
                errors.append(f"{sid}: {exc!r}")
        self.ids.clear()
        assert not errors, f"could not delete sessions: {errors}"
