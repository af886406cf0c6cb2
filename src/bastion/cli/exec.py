"""``bastion exec``: run a command in a session, its output streamed live; exits with
the remote command's status, or :data:`EXEC_FAILED` when ``bastion`` itself failed."""

from __future__ import annotations

import argparse
import sys

from .._client import Bastion
from .._exceptions import (
    JobFailedError,
)
from .common import (
    EXEC_FAILED,
    Subparsers,
    add_remote_parser,
    error_line,
    remote_exit_status,
)
from .errors import ExitCode, error_code
from .format import (
    write_text,
)
from .jobs import add_job_options, forwarded_stdin, job_command, job_limits

# --------------------------------------------------------------------------- exec


def add_exec_command(subparsers: Subparsers) -> None:
    exec_ = add_remote_parser(
        subparsers,
        "exec",
        help="run a command in a session, streaming its output live",
        description="Run a command in a running session, copy its stdout and stderr here "
        "as they are produced, and exit with its exit status, as if it ran here. Put the "
        f"command after --. Exits {EXEC_FAILED} when bastion itself failed (the server "
        "cannot be reached, no such session, ...) and 130 on Ctrl-C (the job keeps "
        "running unless it has a --timeout).",
        examples=[
            "bastion exec $SID -- python3 -u train.py",
            "bastion exec $SID --cwd /tmp --env MODE=fast -- sh -c 'echo \"$MODE in $PWD\"'",
            "bastion exec $SID --shell -- 'ls / | wc -l'",
            'bastion exec $SID --timeout 10m -- make test || echo "exit status $?"',
            "echo 'print(6 * 7)' | bastion exec $SID -- python3",
            "bastion exec $SID --memory-mb 64 --cpu-seconds 2 -- ./solution < input.txt",
        ],
    )
    add_job_options(exec_)
    exec_.set_defaults(runner=_exec)


def _exec(client: Bastion, args: argparse.Namespace) -> int:
    try:
        job = client.jobs.run_and_wait(
            args.session_id,
            job_command(args),
            env=dict(args.env) if args.env else None,
            cwd=args.cwd,
            timeout=args.timeout,
            wait_timeout=args.wait_timeout,
            stdin=forwarded_stdin(args),
            limits=job_limits(args),
            user=args.user,
            on_stdout=lambda text: write_text(sys.stdout, text),
            on_stderr=lambda text: write_text(sys.stderr, text),
        )
    except JobFailedError as exc:
        return _failed_job_status(exc)
    except KeyboardInterrupt:
        # Only the client stops: the job runs on unless it has a --timeout.
        error_line(
            "bastion: interrupted; the job keeps running in the session "
            f"({error_code(KeyboardInterrupt())})"
        )
        return ExitCode.INTERRUPTED
    output = job.get("output")
    status = output["status_code"] if output else None
    return 0 if status is None else remote_exit_status(status)


def _failed_job_status(exc: JobFailedError) -> int:
    """The exit status for a failed job, saying why when its own status does not."""
    status = exc.exit_status
    if status is None or exc.failure_reason not in (None, "nonzero_exit"):
        # The job's stderr has been streamed already; only the reason is news (a
        # plain non-zero exit says it all through the exit status).
        parts = [f"bastion: job {exc.job_id} failed"]
        if status is not None:
            parts.append(f"with exit status {status}")
        parts.append(f"({exc.failure_reason or 'job_failed'})")
        error_line(" ".join(parts))
    return 1 if status is None else remote_exit_status(status)
