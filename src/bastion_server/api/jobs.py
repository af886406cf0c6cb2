"""/v1/sessions/{id}/jobs: run, list, get, wait."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from bastion.wire import JobInfo, JobList, RunJobRequest
from bastion_server.api.auth import owner
from bastion_server.api.deps import services
from bastion_server.api.views import job_view
from bastion_server.service.container import Services

router = APIRouter(prefix="/v1/sessions/{session_id}/jobs", tags=["jobs"])
Owner = Annotated[str, Depends(owner)]
Svc = Annotated[Services, Depends(services)]


@router.post("", status_code=202, response_model=JobInfo)
async def run_job(session_id: str, body: RunJobRequest, who: Owner, svc: Svc) -> JobInfo:
    """Start a command in the background; answers at once with the job id."""
    record = await svc.jobs.run(
        who,
        session_id,
        body.get("command"),
        env=body.get("env"),
        cwd=body.get("cwd"),
        timeout=body.get("timeout"),
    )
    return job_view(record, svc.jobs)


@router.get("", response_model=JobList)
async def list_jobs(session_id: str, who: Owner, svc: Svc) -> JobList:
    return {"jobs": [job_view(r, svc.jobs) for r in svc.jobs.list(who, session_id)]}


@router.get("/{job_id}", response_model=JobInfo)
async def get_job(session_id: str, job_id: str, who: Owner, svc: Svc) -> JobInfo:
    return job_view(svc.jobs.get(who, session_id, job_id), svc.jobs)


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
    return job_view(await svc.jobs.wait(who, session_id, job_id, timeout), svc.jobs)
