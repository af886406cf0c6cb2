"""/v1/sessions/{id}/jobs: run, list, get, wait, stdin, kill; /v1/sessions/{id}/processes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from bastion.wire import (
    FINAL_JOB_STATUSES,
    ErrorCode,
    JobInfo,
    JobList,
    KillJobRequest,
    ProcessList,
    RunJobRequest,
    StdinResult,
)
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.files import request_body
from bastion_server.api.paging import PageParams
from bastion_server.service.container import Services
from bastion_server.service.errors import ServiceError
from bastion_server.store.sqlite import JobRecord

router = APIRouter(prefix="/v1/sessions/{session_id}/jobs", tags=["jobs"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


@router.post(
    "",
    status_code=202,
    response_model=JobInfo,
    responses={200: {"model": JobInfo, "description": "With wait: the job ended meanwhile."}},
)
async def run_job(
    session_id: str,
    body: RunJobRequest,
    who: Owner,
    svc: Svc,
    wait: Annotated[float | None, Query(ge=0)] = None,
) -> Any:
    """Start a command in the background; answers at once with the job id (202).

    With ``wait=SECONDS`` the answer is held until the job ends or that time passes
    (at most the server's maximum hold): a short job's result comes back in this one
    round trip (200 when the job is final, 202 if it still runs, or if the server
    began to shut down meanwhile: the job was made, so its id must reach the caller).
    """
    record = await svc.jobs.run(
        who,
        session_id,
        body.get("command"),
        env=body.get("env"),
        cwd=body.get("cwd"),
        timeout=body.get("timeout"),
        stdin=body.get("stdin"),
        limits=body.get("limits"),
        user=body.get("user"),
    )
    if wait is not None:
        try:
            record = await svc.jobs.wait(who, session_id, record.id, wait)
        except ServiceError as exc:
            if exc.code != ErrorCode.SERVER_SHUTDOWN:
                raise
        if record.status in FINAL_JOB_STATUSES:
            return await _job_response(svc, record)
    return svc.jobs.view(record)


#: Output up to this size (log bytes) is answered inline rather than streamed.
INLINE_OUTPUT = 256 * 1024


async def _job_response(svc: Services, record: JobRecord) -> Response:
    """A job with its output, encoded as JSON while it is streamed out.

    Output runs to megabytes (and a NUL byte takes six in JSON): built whole it would
    cost the server hundreds of MB and block everyone else.  So the output is read,
    decoded and escaped chunk by chunk, in a worker thread."""
    if record.status not in FINAL_JOB_STATUSES or svc.jobs.output_size(record) < INLINE_OUTPUT:
        # Small (the usual case): built right here, no thread hand-off per chunk.
        return JSONResponse(svc.jobs.view(record))
    return StreamingResponse(_job_json(svc, record), media_type="application/json")


def _job_json(svc: Services, record: JobRecord) -> Iterator[bytes]:
    head: dict[str, Any] = dict(svc.jobs.view(record, with_output=False))
    head.pop("output")
    return json_with_output(head, svc, record, record.exit_code)


def json_with_output(
    head: dict[str, Any], svc: Services, record: JobRecord, status_code: int | None
) -> Iterator[bytes]:
    """``head`` with the final job's ``"output"`` (``console_output``, ``errout``,
    ``status_code``) added, as JSON made chunk by chunk (blocking: iterate it in
    worker threads)."""
    yield json.dumps(head)[:-1].encode() + b', "output": {"console_output": "'
    for text in svc.jobs.iter_output(record, "stdout"):
        yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    yield b'", "errout": "'
    for text in svc.jobs.iter_output(record, "stderr"):
        yield json.dumps(text, ensure_ascii=False)[1:-1].encode()
    yield b'", "status_code": ' + json.dumps(status_code).encode() + b"}}"


@router.get("", response_model=JobList)
async def list_jobs(session_id: str, who: Owner, svc: Svc, page: PageParams) -> JobList:
    """The session's jobs, oldest first, without their output (get a job for that), a
    page at a time: pass ``next_cursor`` back as ``cursor`` for the next page."""
    found = svc.jobs.list(who, session_id, page)
    return {
        "jobs": [svc.jobs.view(r, with_output=False) for r in found.items],
        "next_cursor": found.next_cursor,
    }


@router.get("/{job_id}", response_model=JobInfo)
async def get_job(session_id: str, job_id: str, who: Owner, svc: Svc) -> Any:
    return await _job_response(svc, svc.jobs.get(who, session_id, job_id))


@router.get("/{job_id}/wait", response_model=JobInfo)
async def wait_job(
    session_id: str,
    job_id: str,
    who: Owner,
    svc: Svc,
    timeout: Annotated[float | None, Query(ge=0)] = None,
) -> Any:
    """Hold the request until the job is final or ``timeout`` seconds pass (at most the
    server's maximum hold), then answer with the job as it is.  If the server begins to
    shut down meanwhile, the answer is the ``server_shutdown`` error (503)."""
    return await _job_response(svc, await svc.jobs.wait(who, session_id, job_id, timeout))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def job_events(session_id: str, job_id: str, who: Owner, svc: Svc) -> StreamingResponse:
    """The job's status changes and output as NDJSON, from its start (replayed) to its
    end: the last line is ``{"type": "end", "job": ...}``, after the last output.  If
    the server begins to shut down first, the last line is an ``end`` with the job as
    it is and ``"reason": "server_shutdown"``."""
    events = svc.jobs.follow(who, session_id, job_id)
    first = await anext(events)  # unknown ids fail here, as a plain error response

    async def lines() -> AsyncIterator[bytes]:
        yield json.dumps(first).encode() + b"\n"
        async for event in events:
            yield json.dumps(event).encode() + b"\n"

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


@router.post(
    "/{job_id}/stdin",
    response_model=StdinResult,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "required": False,
        }
    },
)
async def write_stdin(
    session_id: str,
    job_id: str,
    request: Request,
    who: Owner,
    svc: Svc,
    close: Annotated[bool, Query()] = False,
) -> StdinResult:
    """Write the raw body to the stdin of a job run with ``"stdin": true``, as it
    arrives (a big input is streamed, never held whole); with ``close=true`` the job's
    stdin is then closed (end of file).  An empty body with ``close=true`` only closes.
    A job still queued is waited for; one that ended is the ``job_state`` error (409)."""
    written, closed = await svc.jobs.write_stdin(
        who, session_id, job_id, request_body(request), close=close
    )
    return {"written": written, "closed": closed}


@router.post("/{job_id}/kill", response_model=JobInfo, status_code=202)
async def kill_job(
    session_id: str, job_id: str, who: Owner, svc: Svc, body: KillJobRequest | None = None
) -> JobInfo:
    """Send a signal (default ``SIGTERM``; ``SIGKILL`` kills the whole tree at once) to
    every process of a running job; answers at once (202) with the job as it is.  The job then ends
    ``failed`` with ``failure_reason`` ``"killed"`` (and ``signal`` if the signal
    ended it).  A job that ended already is the ``job_state`` error (409)."""
    record = await svc.jobs.kill(who, session_id, job_id, (body or {}).get("signal"))
    return svc.jobs.view(record, with_output=False)


processes_router = APIRouter(prefix="/v1/sessions/{session_id}", tags=["sessions"])


@processes_router.get("/processes", response_model=ProcessList)
async def list_processes(session_id: str, who: Owner, svc: Svc) -> ProcessList:
    """Every process of a running session now: pid and parent as the sandbox sees
    them, user, command, CPU time, resident memory, and the running job it belongs to."""
    return {"processes": await svc.jobs.processes(who, session_id)}
