"""``bastion jobs``: run, list, show, wait for, follow and stop jobs."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Mapping
from typing import Any, BinaryIO

from .._client import Bastion
from .._exceptions import (
    APITimeoutError,
    JobFailedError,
)
from ..wire import (
    FINAL_JOB_STATUSES,
    JobEvent,
    JobInfo,
    JobList,
)
from .common import (
    Subparsers,
    add_command,
    add_group,
    add_page_options,
    duration,
    json_mode,
    key_value,
    note_next_page,
    print_lines,
    table_width,
    to_stderr,
)
from .errors import ExitCode
from .format import (
    command_text,
    format_duration,
    format_time_ago,
    job_details,
    job_duration,
    job_exit_text,
    table,
    write_json,
    write_text,
)

#: ``jobs logs`` without ``-f`` on a job that still runs prints what the server
#: replays, and stops once nothing more has come for this long.
LOGS_QUIET_SECONDS = 0.5

# --------------------------------------------------------------------------- jobs


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """SESSION, the command after ``--`` and the job's options (``jobs run``, ``exec``)."""
    parser.add_argument("session_id", metavar="SESSION")
    parser.add_argument("argv", nargs="+", metavar="CMD", help="the command and its arguments")
    parser.add_argument("--shell", action="store_true", help="run the words with /bin/sh -c")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=key_value,
        help="an environment variable for the command (repeatable)",
    )
    parser.add_argument("--cwd", metavar="DIR", help="working directory in the session")
    parser.add_argument(
        "--root",
        action="store_const",
        const="root",
        dest="user",
        help="run as the sandbox's root (of the session's own user namespace), e.g. to "
        "apt-get install",
    )
    parser.add_argument(
        "--timeout",
        type=duration,
        metavar="DURATION",
        help="server-side time limit: the job's processes are killed after it",
    )
    parser.add_argument(
        "--wait-timeout",
        type=duration,
        metavar="DURATION",
        help="give up waiting after this long (the job keeps running)",
    )
    parser.add_argument(
        "-n",
        "--no-stdin",
        action="store_true",
        help="do not forward this command's stdin (forwarded when it is a pipe or a file)",
    )
    limits = parser.add_argument_group("the job's own limits (within the session's)")
    limits.add_argument("--memory-mb", type=int, metavar="MIB", help="memory of its tree")
    limits.add_argument("--cpu-seconds", type=int, metavar="S", help="CPU time per process")
    limits.add_argument("--pids", type=int, metavar="N", help="processes of its tree at once")
    limits.add_argument(
        "--output-bytes", type=int, metavar="N", help="bytes per output stream (then killed)"
    )


def job_command(args: argparse.Namespace) -> str | list[str]:
    return " ".join(args.argv) if args.shell else list(args.argv)


def job_limits(args: argparse.Namespace) -> dict[str, int] | None:
    names = ("memory_mb", "cpu_seconds", "pids", "output_bytes")
    limits = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return limits or None


def forwarded_stdin(args: argparse.Namespace) -> BinaryIO | None:
    """This command's stdin, to feed the job, when it is a pipe or a file (not a
    terminal, not a device such as /dev/null, and not with --no-stdin)."""
    if args.no_stdin:
        return None
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd) or stat.S_ISCHR(os.fstat(fd).st_mode):
            return None
    except (AttributeError, ValueError, OSError):
        return None  # no real stdin (closed, or replaced by a test's capture)
    # The raw file: each read returns what the pipe has now (a buffered read would wait
    # for a whole chunk), so a line typed into a pipe reaches the job at once.
    raw: BinaryIO = getattr(sys.stdin.buffer, "raw", sys.stdin.buffer)
    return raw


def add_jobs(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = add_group(
        subparsers,
        "jobs",
        help="run commands in a session and inspect them",
        description="Run commands (jobs) in a running session, list them, wait for them and "
        "print their output. (bastion exec runs one and streams its output live.)",
        examples=[
            "bastion jobs run $SID -- python3 -c 'print(6 * 7)'",
            "JOB=$(bastion jobs run --no-wait -q $SID -- sleep 1)",
            "bastion jobs wait $SID $JOB",
            "bastion jobs logs -f $SID $JOB",
        ],
    )

    run = add_command(
        actions,
        "run",
        help="run a command and print its output",
        description="Run a command in a session, wait for it and print its output (stdout "
        "here, stderr on stderr). Exits 0 if the job completed, 1 if it failed (with its "
        "exit status and failure reason on stderr). Put the command after --. With "
        "--no-wait, print the queued job (or with -q its id) and return at once.",
        examples=[
            "bastion jobs run $SID -- python3 -c 'print(6 * 7)'",
            "bastion jobs run $SID --shell -- 'ls / | wc -l'",
            "bastion jobs run $SID --env MODE=fast --cwd /tmp -- sh -c 'echo $MODE; pwd'",
            "bastion jobs run $SID --timeout 5s -- sleep 1",
            "JOB=$(bastion jobs run --no-wait -q $SID -- sleep 1)",
            "bastion jobs run $SID --json -- uname -a",
        ],
        parents=common,
    )
    add_job_options(run)
    run.add_argument("--no-wait", action="store_true", help="print the queued job and exit")
    run.add_argument(
        "-q", "--quiet", action="store_true", help="with --no-wait: print only the job id"
    )
    run.set_defaults(runner=_jobs_run)

    kill = add_command(
        actions,
        "kill",
        help="send a signal to a running job",
        description="Send a signal (default SIGTERM) to every process of a running job; "
        "SIGKILL kills its whole tree at once. The job then ends failed, with failure "
        "reason killed.",
        examples=[
            "bastion jobs kill $SID $JOB",
            "bastion jobs kill $SID $JOB --signal SIGKILL",
        ],
        parents=common,
    )
    kill.add_argument("session_id", metavar="SESSION")
    kill.add_argument("job_id", metavar="JOB")
    kill.add_argument(
        "-s", "--signal", default="SIGTERM", help="a signal name or number (default SIGTERM)"
    )
    kill.set_defaults(runner=_jobs_kill)

    list_ = add_command(
        actions,
        "list",
        help="list a session's jobs",
        description="List a session's jobs, oldest first.",
        examples=[
            "bastion jobs list $SID",
            "bastion jobs list $SID -q",
            "bastion jobs list $SID --json",
        ],
        parents=common,
    )
    list_.add_argument("session_id", metavar="SESSION")
    list_.add_argument("-q", "--quiet", action="store_true", help="print only the job ids")
    add_page_options(list_, "jobs")
    list_.set_defaults(runner=_jobs_list)

    get = add_command(
        actions,
        "get",
        help="show a job",
        description="Show a job: its state, exit status, failure reason, times and the "
        "size of its output (bastion jobs logs prints the output).",
        examples=["bastion jobs get $SID $JOB", "bastion jobs get $SID $JOB --json"],
        parents=common,
    )
    get.add_argument("session_id", metavar="SESSION")
    get.add_argument("job_id", metavar="JOB")
    get.set_defaults(runner=_jobs_get)

    wait = add_command(
        actions,
        "wait",
        help="wait for a job to end",
        description="Wait until a job has ended and show it. Exits 0 if it completed, 1 if "
        "it failed, 7 if --timeout passed first (the job keeps running).",
        examples=["bastion jobs wait $SID $JOB", "bastion jobs wait $SID $JOB --timeout 30s"],
        parents=common,
    )
    wait.add_argument("session_id", metavar="SESSION")
    wait.add_argument("job_id", metavar="JOB")
    wait.add_argument("--timeout", type=duration, metavar="DURATION", help="wait at most this long")
    wait.set_defaults(runner=_jobs_wait)

    logs = add_command(
        actions,
        "logs",
        help="print a job's output (-f: follow it live)",
        description="Print a job's output, stdout here and stderr on stderr, in the order it "
        "was written. With -f, follow a running job until it ends. Without -f, a job that "
        "still runs shows its output so far. With --json, print the job's events as "
        "JSON lines. Exits 0 once the output is printed, whatever the job's status "
        "(bastion jobs wait tells that).",
        examples=[
            "bastion jobs logs $SID $JOB",
            "bastion jobs logs -f $SID $JOB",
            "bastion jobs logs $SID $JOB --json",
        ],
        parents=common,
    )
    logs.add_argument("session_id", metavar="SESSION")
    logs.add_argument("job_id", metavar="JOB")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="follow the output until the job ends"
    )
    logs.set_defaults(runner=_jobs_logs)


def _job_failed_line(job: Mapping[str, Any]) -> str:
    parts = [f"bastion: job {job.get('job_id')} failed"]
    exit_text = job_exit_text(job)
    if exit_text != "-":
        parts.append(f"with exit status {exit_text}")
    parts.append(f"({job.get('failure_reason') or 'job_failed'})")
    return " ".join(parts)


def _jobs_run(client: Bastion, args: argparse.Namespace) -> int:
    command = job_command(args)
    env = dict(args.env) if args.env else None
    if args.no_wait:
        job = client.jobs.run(
            args.session_id,
            command,
            env=env,
            cwd=args.cwd,
            timeout=args.timeout,
            stdin=forwarded_stdin(args),
            limits=job_limits(args),
            user=args.user,
        )
        if json_mode(args):
            write_json(sys.stdout, job)
        elif args.quiet:
            print_lines([job["job_id"]])
        else:
            print_lines(job_details(job))
        return ExitCode.OK
    try:
        job = client.jobs.run_and_wait(
            args.session_id,
            command,
            env=env,
            cwd=args.cwd,
            timeout=args.timeout,
            wait_timeout=args.wait_timeout,
            stdin=forwarded_stdin(args),
            limits=job_limits(args),
            user=args.user,
        )
    except JobFailedError as exc:
        _print_job_output(exc.result, args)
        to_stderr(_job_failed_line(exc.result))
        return ExitCode.FAILED
    _print_job_output(job, args)
    return ExitCode.OK


def _print_job_output(job: JobInfo, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, job)
        return
    output = job.get("output")
    if output:
        if output.get("console_output"):
            write_text(sys.stdout, output["console_output"])
        if output.get("errout"):
            write_text(sys.stderr, output["errout"])


def _jobs_kill(client: Bastion, args: argparse.Namespace) -> int:
    signal: str | int = int(args.signal) if args.signal.isdigit() else args.signal
    job = client.jobs.kill(args.session_id, args.job_id, signal)
    if json_mode(args):
        write_json(sys.stdout, job)
    return ExitCode.OK


def _jobs_list(client: Bastion, args: argparse.Namespace) -> int:
    result = client.jobs.list(args.session_id, limit=args.limit, cursor=args.cursor)
    _print_jobs(result, args)
    note_next_page(result)
    return ExitCode.OK


def _print_jobs(result: JobList, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, result)
        return
    jobs = result["jobs"]
    if args.quiet:
        print_lines([j["job_id"] for j in jobs])
        return
    if not jobs:
        to_stderr(f"no jobs in session {args.session_id}")
        return
    rows = []
    for j in jobs:
        status = str(j.get("status", "-"))
        reason = j.get("failure_reason")
        if reason and reason != "nonzero_exit":
            status += f" ({reason})"
        rows.append(
            [
                j["job_id"],
                status,
                format_time_ago(j.get("created_at")),
                format_duration(job_duration(j)),
                command_text(j.get("command")),
            ]
        )
    print_lines(
        table(
            ["JOB", "STATUS", "CREATED", "DURATION", "COMMAND"],
            rows,
            right=["DURATION"],
            max_width=table_width(),
        )
    )


def _show_job(job: JobInfo, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, job)
    else:
        print_lines(job_details(job))


def _jobs_get(client: Bastion, args: argparse.Namespace) -> int:
    _show_job(client.jobs.get(args.session_id, args.job_id), args)
    return ExitCode.OK


def _jobs_wait(client: Bastion, args: argparse.Namespace) -> int:
    try:
        job = client.jobs.wait(args.session_id, args.job_id, timeout=args.timeout)
    except JobFailedError as exc:
        _show_job(exc.result, args)
        to_stderr(_job_failed_line(exc.result))
        return ExitCode.FAILED
    _show_job(job, args)
    return ExitCode.OK


def _jobs_logs(client: Bastion, args: argparse.Namespace) -> int:
    as_json = json_mode(args)

    def emit(event: JobEvent) -> None:
        if as_json:
            write_json(sys.stdout, event, indent=None)
        elif event["type"] == "stdout":
            write_text(sys.stdout, event.get("data", ""))
        elif event["type"] == "stderr":
            write_text(sys.stderr, event.get("data", ""))

    job = client.jobs.get(args.session_id, args.job_id)
    if args.follow or job["status"] in FINAL_JOB_STATUSES:
        with client.jobs.stream(args.session_id, args.job_id) as events:
            for event in events:
                emit(event)
        return ExitCode.OK
    # Still running and not followed: what the server replays, until it goes quiet.
    replay = client.jobs._iter_events(args.session_id, args.job_id, LOGS_QUIET_SECONDS)
    try:
        for event in replay:
            emit(event)
    except APITimeoutError:
        pass
    finally:
        replay.close()
    return ExitCode.OK
