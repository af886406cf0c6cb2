"""Helpers shared by the integration tests of transfers and stalls."""

from __future__ import annotations

import time

from bastion import Bastion


def shell(client: Bastion, sid: str, script: str) -> str:
    """Run ``script`` with ``sh -c`` in the session; its stdout (its exit status does not
    matter: the output is the answer)."""
    job = client.jobs.run(sid, ["sh", "-c", script + "\ntrue"])
    result = client.jobs.wait(sid, job["job_id"], timeout=120)
    assert result["status"] == "completed", result
    output = result["output"]
    assert output is not None
    return str(output["console_output"])


def stop_or_delete(client: Bastion, sid: str, action: str) -> float:
    """Stop or delete the session (``action``); how long it took, in seconds."""
    began = time.monotonic()
    if action == "stop":
        client.sessions.stop(sid)
    else:
        client.sessions.delete(sid)
    return time.monotonic() - began
