"""The public bastion-py-sdk 1.0.0 wheel's ``generated_client``, unmodified, against a
real ``bastion serve``: every endpoint it has, on real sandboxes, in a fresh venv.

That wheel is the client of the original Bastion server (Go, Docker); the server
serves that API beside /v1 (src/bastion_server/api/legacy.py).  The wheel comes from
the package index (``pip install bastion-py-sdk==1.0.0``), or from a directory
holding it when ``BASTION_LEGACY_WHEELS`` names one (offline runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import KEY_A, KEY_B, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

LEGACY = "bastion-py-sdk==1.0.0"


@pytest.fixture(scope="module")
def legacy_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The interpreter of a fresh venv with only the 1.0.0 wheel (and its deps)."""
    venv = tmp_path_factory.mktemp("legacy-venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    args = [str(python), "-m", "pip", "install", "--quiet", LEGACY]
    if wheels := os.environ.get("BASTION_LEGACY_WHEELS"):
        args += ["--find-links", wheels]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # The old wheel and nothing of ours: `bastion` is not importable there.
    probe = subprocess.run(
        [str(python), "-c", "import generated_client, importlib.util as u;"
         "print(u.find_spec('bastion') is None)"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == "True"
    yield python


# Runs inside the legacy venv: drives every endpoint, records what it saw as JSON.
DRIVER = textwrap.dedent(
    r"""
    import json, sys, time
    import websocket
    from generated_client import ApiClient, Configuration
    from generated_client.api import FilesApi, JobsApi, SessionsApi, SystemApi, TerminalApi
    from generated_client.exceptions import ApiException
    from generated_client.models import DeleteRequest, JobExecRequest, UploadFileRequestMetadata

    url, key, other_key = sys.argv[1:4]
    seen = {}

    def client(token):
        return ApiClient(Configuration(host=url, access_token=token))

    def status_of(call):
        try:
            call()
        except ApiException as exc:
            return exc.status, json.loads(exc.body) if exc.body else None
        return 200, None

    api = client(key)
    sessions, jobs, files = SessionsApi(api), JobsApi(api), FilesApi(api)

    SystemApi(client(None)).health_check()
    seen["health"] = "ok"

    created = sessions.create_session()
    sid = created.session_id
    seen["created"] = [created.status.value, created.created_at is not None]
    seen["exec_before_start"] = status_of(
        lambda: jobs.execute_command(sid, JobExecRequest(cmd=["true"])))
    started = sessions.start_session(sid)
    seen["started"] = [started.id == sid, started.status.value]
    seen["started_again"] = sessions.start_session(sid).status.value
    seen["status"] = sessions.get_session_status(sid).status.value

    # jobs
    script = "echo out; echo err >&2; exit 3"
    queued = jobs.execute_command(sid, JobExecRequest(cmd=["sh", "-c", script]))
    seen["queued"] = queued.status.value
    for _ in range(200):
        job = jobs.get_job_status(sid, queued.job_id)
        if job.status.value in ("completed", "failed"):
            break
        time.sleep(0.05)
    seen["job"] = [job.status.value, job.cmd, job.output.console_output, job.output.errout,
                   job.output.status_code]
    big = jobs.execute_command(sid, JobExecRequest(cmd=["sh", "-c", "yes abc | head -c 700000"]))
    for _ in range(400):
        job = jobs.get_job_status(sid, big.job_id)
        if job.output is not None:
            break
        time.sleep(0.05)
    seen["big_output"] = [len(job.output.console_output.encode()), job.output.status_code]
    seen["bad_cmd"] = status_of(lambda: jobs.execute_command(sid, JobExecRequest(cmd=[])))
    seen["no_job"] = status_of(lambda: jobs.get_job_status(sid, "job_nope"))

    # files: upload (nested, binary), list, download, run it, delete
    payload = bytes(range(256)) * 4096
    meta = UploadFileRequestMetadata
    up = files.upload_file(sid, ("data.bin", payload), meta(path="dir/data.bin"))
    seen["upload"] = [up.status, up.path]
    files.upload_file(sid, ("hi.sh", b"echo hi from a file"), meta(path="/hi.sh"))
    listing = files.list_files(sid, path="/")
    seen["list_root"] = sorted((f.name, f.is_dir) for f in listing.files
                               if f.name in ("dir", "hi.sh"))
    sub = files.list_files(sid, path="dir")
    seen["list_dir"] = [(f.name, f.size, f.mode, f.mod_time is not None) for f in sub.files]
    seen["download_ok"] = files.download_file(sid, path="dir/data.bin") == payload
    ran = jobs.execute_command(sid, JobExecRequest(cmd=["sh", "hi.sh"]))
    for _ in range(200):
        job = jobs.get_job_status(sid, ran.job_id)
        if job.output is not None:
            break
        time.sleep(0.05)
    seen["job_sees_upload"] = job.output.console_output
    seen["upload_again"] = status_of(
        lambda: files.upload_file(sid, ("hi.sh", b"other"), meta(path="hi.sh")))
    seen["upload_onto_dir"] = status_of(
        lambda: files.upload_file(sid, ("d", b"x"), meta(path="dir")))
    seen["download_missing"] = status_of(lambda: files.download_file(sid, path="nope"))
    seen["download_dir"] = status_of(lambda: files.download_file(sid, path="dir"))
    seen["escape"] = status_of(lambda: files.download_file(sid, path="../../etc/passwd"))
    seen["delete"] = files.delete_file(sid, DeleteRequest(path="dir")).status
    seen["after_delete"] = status_of(lambda: files.list_files(sid, path="dir"))
    seen["delete_root"] = status_of(lambda: files.delete_file(sid, DeleteRequest(path="/")))

    # pagination
    for i in range(5):
        files.upload_file(sid, ("f", b"x"), UploadFileRequestMetadata(path=f"pages/f{i}"))
    page = files.list_files(sid, path="pages", page=2, limit=2)
    seen["page"] = [page.page, page.limit, page.total, page.total_pages,
                    [f.name for f in page.files]]

    # terminal: the generated call (a plain GET) is told to upgrade; the socket works
    seen["terminal_get"] = status_of(lambda: TerminalApi(api).connect_terminal(sid))
    ws = websocket.create_connection(
        url.replace("http://", "ws://") + f"/session/{sid}/terminal?api_token={key}", timeout=30)
    init = json.loads(ws.recv())
    ws.send(json.dumps({"type": "term_input", "client_id": init["client_id"], "session_id": sid,
                        "payload": {"input": "echo legacy-$((6*7))\n"}}))
    out, deadline = "", time.time() + 30
    while "legacy-42" not in out and time.time() < deadline:
        msg = json.loads(ws.recv())
        if msg["type"] == "term_output":
            out += msg["payload"]["output"]
    ws.close()
    seen["terminal"] = [init["type"], init["session_id"] == sid, "legacy-42" in out]
    try:
        bad = websocket.create_connection(
            url.replace("http://", "ws://") + f"/session/{sid}/terminal?api_token=wrong-key-123",
            timeout=30)
        seen["terminal_bad_key"] = json.loads(bad.recv())["type"]
    except Exception as exc:
        seen["terminal_bad_key"] = repr(exc)

    # tenancy and auth: another key sees nothing, no key is refused
    other = SessionsApi(client(other_key))
    seen["other_key_status"] = status_of(lambda: other.get_session_status(sid))
    seen["other_key_delete"] = status_of(lambda: other.delete_session(sid))
    seen["no_key"] = status_of(lambda: SessionsApi(client(None)).create_session())

    stopped = sessions.stop_session(sid)
    seen["stopped"] = [stopped.status.value, sessions.stop_session(sid).status.value]
    deleted = sessions.delete_session(sid)
    seen["deleted"] = [deleted.session_id == sid, deleted.status.value,
                       sessions.get_session_status(sid).status.value]
    print(json.dumps(seen))
    """
)


def test_generated_client_drives_every_endpoint(
    legacy_python: Path, auth_server: ServerProcess, tmp_path: Path
) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    done = subprocess.run(
        [str(legacy_python), str(driver), auth_server.url, KEY_A, KEY_B],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)

    assert seen["health"] == "ok"
    assert seen["created"] == ["created", True]
    assert seen["exec_before_start"][0] == 403
    assert "running" in seen["exec_before_start"][1]["error"]
    assert seen["started"] == [True, "running"]
    assert seen["started_again"] == "running"
    assert seen["status"] == "running"

    assert seen["queued"] == "queued"
    status, cmd, out, err, code = seen["job"]
    assert cmd == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert (out, err, code) == ("out\n", "err\n", 3)
    assert status in ("completed", "failed")
    assert seen["big_output"] == [700000, 0]  # streamed by the server, whole here
    assert seen["bad_cmd"][0] == 400 and isinstance(seen["bad_cmd"][1]["error"], str)
    assert seen["no_job"][0] == 404

    assert seen["upload"] == ["success", "dir/data.bin"]
    assert seen["list_root"] == [["dir", True], ["hi.sh", False]]
    assert seen["list_dir"] == [["data.bin", 256 * 4096, "-rw-r--r--", True]]
    assert seen["download_ok"] is True
    assert seen["job_sees_upload"] == "hi from a file\n"
    assert seen["upload_again"] == [409, {"error": "File already exists"}]  # never replaced
    assert seen["upload_onto_dir"][0] == 409
    assert seen["download_missing"][0] == 404
    assert seen["download_dir"][0] == 403
    assert seen["escape"][0] == 400
    assert seen["delete"] == "deleted successfully"
    assert seen["after_delete"][0] == 404
    assert seen["delete_root"][0] == 403
    assert seen["page"] == [2, 2, 5, 3, ["f2", "f3"]]

    assert seen["terminal_get"][0] == 426
    assert seen["terminal"] == ["init", True, True]
    assert seen["terminal_bad_key"] == "error"

    assert seen["other_key_status"][0] == 404
    assert seen["other_key_delete"][0] == 404
    assert seen["no_key"] == [401, {"error": seen["no_key"][1]["error"]}]

    assert seen["stopped"] == ["stopped", "stopped"]
    assert seen["deleted"] == [True, "deleted", "deleted"]


def test_upload_and_errors_in_the_old_shapes(auth_server: ServerProcess) -> None:
    """What the generated client never sends, answered as the old server would."""
    import httpx

    auth = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=auth_server.url, headers=auth, timeout=60) as http:
        sid = http.post("/session/create").json()["session_id"]
        http.post(f"/session/{sid}/start")
        try:
            meta = ("metadata", (None, json.dumps({"path": "x.txt"})))
            file_first = http.post(
                f"/session/{sid}/upload", files=[("file", ("x.txt", b"data")), meta]
            )
            assert file_first.status_code == 400
            assert "Metadata required" in file_first.json()["error"]
            not_multipart = http.post(f"/session/{sid}/upload", content=b"plain")
            assert not_multipart.status_code == 400
            assert isinstance(not_multipart.json()["error"], str)
            body = (
                b'--b\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n'
                b'{"path": "cut.txt"}\r\n--b\r\nContent-Disposition: form-data; '
                b'name="file"; filename="cut.txt"\r\n\r\nno closing delimiter'
            )
            cut = http.post(
                f"/session/{sid}/upload",
                content=body,
                headers={"Content-Type": "multipart/form-data; boundary=b"},
            )
            assert cut.status_code == 400, cut.text
            listing = http.get(f"/session/{sid}/list", params={"path": "/"}).json()
            assert "cut.txt" not in [f["name"] for f in listing["files"]]  # nothing half-written
            # A file uploaded under a name the old client would send, big and streamed.
            big = bytes(range(256)) * 8192  # 2 MiB: more than a JSON body may be
            ok = http.post(
                f"/session/{sid}/upload",
                files=[meta, ("file", ("x.txt", big))],
            )
            assert ok.json() == {"status": "success", "path": "x.txt"}
            got = http.get(f"/session/{sid}/download", params={"path": "/x.txt"})
            assert got.content == big
            assert "x.txt" in got.headers["content-disposition"]
            assert got.headers["content-type"].startswith("text/plain")
        finally:
            http.delete(f"/session/{sid}")
        wrong = httpx.post(
            f"{auth_server.url}/session/create", headers={"Authorization": "Bearer nope-nope-nope"}
        )
        assert wrong.status_code == 401
        assert isinstance(wrong.json()["error"], str)  # the old shape, not /v1's object
        unknown = http.get("/session/ses_nope/status")
        assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
