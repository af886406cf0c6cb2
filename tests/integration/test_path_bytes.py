"""A path's bytes that are not UTF-8, sent percent-encoded in the URL, name those very
bytes: a raw ``%ff`` makes a file whose name is the byte 0xff, not U+FFFD twice."""

from __future__ import annotations

import httpx
import pytest
from tests.conftest import ServerProcess

from bastion import Bastion

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _names_in(client: Bastion, sid: str, directory: str) -> list[bytes]:
    script = "import os, sys; print(*(n.hex() for n in os.listdir(sys.argv[1].encode())))"
    job = client.jobs.run_and_wait(sid, ["python3", "-c", script, directory])
    return sorted(bytes.fromhex(n) for n in job["output"]["console_output"].split())


def test_a_raw_percent_ff_names_the_byte_and_round_trips(
    server: ServerProcess, client: Bastion, sid: str
) -> None:
    base = f"{server.url}/v1/sessions/{sid}/files"
    client.jobs.run_and_wait(sid, ["mkdir", "-p", "/home/user/raw"])
    with httpx.Client(timeout=30) as http:
        put = http.put(f"{base}?path=/home/user/raw/%ff%fe.txt", content=b"raw bytes")
        assert put.status_code == 200, put.text
        assert put.json()["path"] == "/home/user/raw/\udcff\udcfe.txt"
        assert _names_in(client, sid, "/home/user/raw") == [b"\xff\xfe.txt"]
        listed = http.get(f"{base}?path=/home/user/raw").json()["files"]
        assert [f["name"] for f in listed] == ["\udcff\udcfe.txt"]
        got = http.get(f"{base}/content?path=/home/user/raw/%FF%FE.txt")
        assert (got.status_code, got.content) == (200, b"raw bytes")
        # A name that is UTF-8 (é) stays that name, percent-encoded or not.
        assert http.put(f"{base}?path=/home/user/raw/%C3%A9.txt", content=b"e").status_code == 200
        gone = http.delete(f"{base}?path=/home/user/raw/%ff%fe.txt")
        assert gone.status_code == 200, gone.text
    assert _names_in(client, sid, "/home/user/raw") == ["é.txt".encode()]
