"""/v1/sessions/{id}/jobs: run, list, get, wait."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse

from bastion.wire import FINAL_JOB_STATUSES, JobInfo, JobList, RunJobRequest
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.service.container import Services

router = APIRouter(prefix="/v1/sessions/{session_id}/jobs", tags=["jobs"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


@router.post("", status_code=202, response_model=JobInfo)
async def run_job(
    session_id: str,
    body: RunJobRequest,
    who: Owner,
    svc: Svc,
    response: Response,
    wait: Annotated[float | None, Query(ge=0)] = None,
) -> JobInfo:
    """Start a command in the background; answers at once with the job id (202).

    With ``wait=SECONDS`` the answer is held until the job ends or that time passes
    (at most the server's maximum hold): a short job's result comes back in this one
    round trip (200 when the job is final, 202 if it still runs).
    """
    record = await svc.jobs.run(
        who,
        session_id,
        body.get("command"),
        env=body.get("env"),
        cwd=body.get("cwd"),
        timeout=body.get("timeout"),
    )
    if wait is not None:
        record = await svc.jobs.wait(who, session_id, record.id, wait)
        if record.status in FINAL_JOB_STATUSES:
            response.status_code = 200
    return svc.jobs.view(record)


@router.get("", response_model=JobList)
async def list_jobs(session_id: str, who: Owner, svc: Svc) -> JobList:
    return {"jobs": [svc.jobs.view(r) for r in svc.jobs.list(who, session_id)]}


@router.get("/{job_id}", response_model=JobInfo)
async def get_job(session_id: str, job_id: str, who: Owner, svc: Svc) -> JobInfo:
    return svc.jobs.view(svc.jobs.get(who, session_id, job_id))


@router.get("/{job_id}/wait", response_model=JobInfo)
async def wait_job(
    session_id: str,
    job_id: str,
    who: Owner,
    svc: Svc,
    timeout: Annotated[float | None, Query(ge=0)] = None,
) -> JobInfo:
    """Hold the request until the job is final or ``timeout`` seconds pass (at most the
    server's maximum hold), then answer with the job as it is."""
    return svc.jobs.view(await svc.jobs.wait(who, session_id, job_id, timeout))


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def job_events(session_id: str, job_id: str, who: Owner, svc: Svc) -> StreamingResponse:
    """The job's status changes and output as NDJSON, from its start (replayed) to its
    end: the last line is ``{"type": "end", "job": ...}``, after the last output."""
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
