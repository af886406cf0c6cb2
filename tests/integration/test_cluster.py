"""Sessions across a real Ray cluster of three nodes on this machine (issue 16).

Ray's own multi-node helper starts a head and two worker nodes as real raylets, each
named by a ``bastion_node_<name>`` resource (bastion_server/cluster/testing_cluster.py,
in a process of its own); a real ``bastion serve --ray ADDRESS`` is the gateway.
Health checks are tuned so a killed node is noticed in about two seconds (Ray's
default: twelve).  The node w2 has an images directory of its own, holding the default
image alone; head and w1 share the gateway's.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bastion import Bastion, NotFoundError, SessionStartError, SnapshotStateError
from bastion_server.image.store import ImageStore
from bastion_server.testing import IMAGES_DIR, ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.integration]

pytest.importorskip("ray")

from bastion_server.cluster.testing_cluster import LocalRayCluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(data_root: Path) -> Iterator[LocalRayCluster]:
    w2_images = data_root / "w2-images"
    (w2_images / "layers").mkdir(parents=True)
    base = ImageStore(IMAGES_DIR).base("default").path
    (w2_images / base.name).symlink_to(base)  # the default image, and nothing else
    c = LocalRayCluster(["head", "w1", f"w2={w2_images}"])
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def gateway(cluster: LocalRayCluster, data_root: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        data_root / "gw",
        extra_args=("--ray", cluster.address, "--pool-size", "0"),
    )
    srv.start(timeout=180)
    yield srv
    srv.delete_all_sessions()
    srv.stop()


@pytest.fixture(scope="module")
def placed(gateway: ServerProcess) -> dict[str, str]:
    """One running session per node: {node name: session id}."""
    found: dict[str, str] = {}
    with Bastion(base_url=gateway.url) as bastion:
        for _ in range(3):
            sid = bastion.sessions.create()["session_id"]
            bastion.sessions.start(sid)
            node = bastion.sessions.get(sid)["node"]
            assert node is not None
            found[node] = sid
    return found


def test_sessions_spread_over_every_node(placed: dict[str, str]) -> None:
    # The emptiest node takes each new session: three sessions, three nodes.
    assert set(placed) == {"head", "w1", "w2"}


def test_jobs_and_their_streams_on_every_node(
    gateway: ServerProcess, placed: dict[str, str]
) -> None:
    with Bastion(base_url=gateway.url) as bastion:
        for sid in placed.values():
            result = bastion.jobs.run_and_wait(sid, ["sh", "-c", "echo out; echo err >&2"])
            assert result["output"]["console_output"] == "out\n"
            job = bastion.jobs.run(sid, ["sh", "-c", "echo one; sleep 0.3; echo two >&2"])
            with bastion.jobs.stream(sid, job["job_id"]) as events:
                seen = list(events)
            kinds = [e["type"] for e in seen]
            assert kinds[-1] == "end" and "stdout" in kinds and "stderr" in kinds
            assert "".join(e.get("data", "") for e in seen if e["type"] == "stdout") == "one\n"


def test_a_large_output_streams_through(gateway: ServerProcess, placed: dict[str, str]) -> None:
    # 8 MiB through sandbox agent -> node agent -> data plane -> gateway, whole.
    with Bastion(base_url=gateway.url) as bastion:
        result = bastion.jobs.run_and_wait(
            placed["w1"], ["sh", "-c", "head -c 8388608 /dev/zero | tr '\\0' x"], timeout=60
        )
        assert len(result["output"]["console_output"]) == 8 * 1024 * 1024


def test_a_terminal_on_a_worker_node(gateway: ServerProcess, placed: dict[str, str]) -> None:
    screen: list[str] = []

    def on_message(message: Any) -> None:
        if message["type"] == "term_output":
            screen.append(str(message["payload"]["data"]))

    with (
        Bastion(base_url=gateway.url) as bastion,
        bastion.terminal.connect(session_id=placed["w2"], on_message=on_message) as term,
    ):
        term.exec("echo $((6 * 7)); exit 3")
        assert term.wait(timeout=10) == {"exit_code": 3, "reason": "exited"}
    assert "42" in "".join(screen)


def test_stop_and_start_keep_the_node(gateway: ServerProcess, placed: dict[str, str]) -> None:
    sid = placed["w1"]
    with Bastion(base_url=gateway.url) as bastion:
        bastion.jobs.run_and_wait(sid, ["sh", "-c", "echo kept > /home/user/mark"])
        assert bastion.sessions.stop(sid)["status"] == "stopped"
        started = bastion.sessions.start(sid)
        assert started["status"] == "running" and started["node"] == "w1"
        result = bastion.jobs.run_and_wait(sid, ["cat", "/home/user/mark"])
        assert result["output"]["console_output"] == "kept\n"


def test_files_on_a_worker_node(gateway: ServerProcess, placed: dict[str, str]) -> None:
    sid = placed["w1"]
    data = bytes(range(256)) * (24 * 1024 + 3)  # 6 MiB and a bit: several frames
    with Bastion(base_url=gateway.url) as bastion:
        bastion.files.upload(sid, data, "/home/user/blob.bin")
        assert bastion.files.download(sid, "/home/user/blob.bin") == data
        names = [f["name"] for f in bastion.files.list(sid, "/home/user")["files"]]
        assert "blob.bin" in names
        result = bastion.jobs.run_and_wait(sid, ["wc", "-c", "/home/user/blob.bin"])
        assert result["output"]["console_output"].split()[0] == str(len(data))
        bastion.files.delete(sid, "/home/user/blob.bin")
        with pytest.raises(NotFoundError):
            bastion.files.download(sid, "/home/user/blob.bin")


def test_snapshots_live_on_their_node_and_sessions_of_them_go_there(
    gateway: ServerProcess, placed: dict[str, str]
) -> None:
    sid = placed["w1"]
    with Bastion(base_url=gateway.url) as bastion:
        bastion.jobs.run_and_wait(sid, ["sh", "-c", "echo one > /home/user/state"])
        snap = bastion.sessions.snapshot(sid, name="on-w1")
        assert snap["status"] == "ready"
        bastion.jobs.run_and_wait(sid, ["sh", "-c", "echo two > /home/user/state"])
        made: list[str] = []
        try:
            # w1 is no emptier than the others: the snapshot, not the load, decides.
            copy = bastion.sessions.create(snapshot=snap["snapshot_id"])
            made.append(copy["session_id"])
            assert copy["node"] == "w1"
            bastion.sessions.start(copy["session_id"])
            result = bastion.jobs.run_and_wait(copy["session_id"], ["cat", "/home/user/state"])
            assert result["output"]["console_output"] == "one\n"
            # Fork: a snapshot of the session, and copies of it on its node.
            forked = bastion.sessions.fork(sid, 2)
            made += [s["session_id"] for s in forked["sessions"]]
            assert [s["node"] for s in forked["sessions"]] == ["w1", "w1"]
            for s in forked["sessions"]:
                result = bastion.jobs.run_and_wait(s["session_id"], ["cat", "/home/user/state"])
                assert result["output"]["console_output"] == "two\n"
            # Restore: the session's files are the snapshot's again.
            restored = bastion.sessions.restore(sid, snap["snapshot_id"])
            assert (restored["status"], restored["node"]) == ("running", "w1")
            result = bastion.jobs.run_and_wait(sid, ["cat", "/home/user/state"])
            assert result["output"]["console_output"] == "one\n"
            # A snapshot of another node's session is not taken: it is not on w1.  The
            # refusal comes before the restore would stop the session: it runs on.
            other = bastion.sessions.snapshot(placed["head"])
            with pytest.raises(SnapshotStateError, match="only take a snapshot of its own node"):
                bastion.sessions.restore(sid, other["snapshot_id"])
            assert bastion.sessions.get(sid)["status"] == "running"
            # Pause and resume on the node.
            assert bastion.sessions.pause(sid)["status"] == "paused"
            assert bastion.sessions.resume(sid)["status"] == "running"
            assert (
                bastion.jobs.run_and_wait(sid, ["echo", "thawed"])["output"]["console_output"]
                == "thawed\n"
            )
        finally:
            for copy_id in made:
                bastion.sessions.delete(copy_id)
            for s in bastion.snapshots.list()["snapshots"]:
                bastion.snapshots.delete(s["snapshot_id"])


def test_sessions_of_an_image_go_only_to_nodes_that_hold_it(
    gateway: ServerProcess, placed: dict[str, str]
) -> None:
    # The build's sandbox runs on the gateway's own node (head); its layer is stored in
    # the gateway's images directory, which w1 shares and w2 does not.  Three sessions
    # would go one to each node by load alone: w2 takes none.
    made: list[str] = []
    with Bastion(base_url=gateway.url) as bastion:
        info = bastion.images.build(
            {"name": "clustered", "from": "default", "run": ["echo built > /etc/clustered"]}
        )
        assert info["status"] == "ready", info
        try:
            for _ in range(3):
                made.append(bastion.sessions.create(image="clustered")["session_id"])
                assert bastion.sessions.start(made[-1])["node"] in {"head", "w1"}
                result = bastion.jobs.run_and_wait(made[-1], ["cat", "/etc/clustered"])
                assert result["output"]["console_output"] == "built\n"
            # The default image is on every node: the emptiest, w2, takes the next.
            made.append(bastion.sessions.create()["session_id"])
            assert bastion.sessions.get(made[-1])["node"] == "w2"
        finally:
            for sid in made:
                bastion.sessions.delete(sid)
            bastion.images.delete("clustered")


def test_a_gateway_killed_mid_job_finds_every_session_and_the_job_again(
    gateway: ServerProcess, placed: dict[str, str]
) -> None:
    # The node agents outlive the gateway (detached actors), and the sandboxes' agents
    # its jobs: a new gateway finds the agents by name, each its sandboxes, running on
    # where they were, and takes the job up again where its log ends.
    with Bastion(base_url=gateway.url) as bastion:
        sid = placed["w1"]
        job = bastion.jobs.run(sid, ["sh", "-c", "echo before; sleep 4; echo after"])
        with bastion.jobs.stream(sid, job["job_id"]) as events:
            for event in events:
                if event["type"] == "stdout" and "before" in event.get("data", ""):
                    break
    gateway.stop(signal.SIGKILL)
    gateway.start(timeout=180)
    with Bastion(base_url=gateway.url) as bastion:
        done = bastion.jobs.wait(sid, job["job_id"], timeout=60)
        assert done["status"] == "completed", done
        assert done["output"]["console_output"] == "before\nafter\n"
        for node, sid in placed.items():
            session = bastion.sessions.get(sid)
            assert (session["status"], session["node"]) == ("running", node)
            result = bastion.jobs.run_and_wait(sid, ["echo", node])
            assert result["output"]["console_output"] == f"{node}\n"


def test_a_killed_node_has_its_sessions_reported_lost(
    cluster: LocalRayCluster, gateway: ServerProcess, placed: dict[str, str], data_root: Path
) -> None:
    doomed, survivors = placed["w2"], [placed["head"], placed["w1"]]
    with Bastion(base_url=gateway.url) as bastion:
        bastion.jobs.run_and_wait(doomed, ["sh", "-c", "echo kept > /home/user/w2-state"])
        snap = bastion.sessions.snapshot(doomed)["snapshot_id"]  # on w2
        running = bastion.jobs.run(doomed, ["sleep", "60"])
        survivor_job = bastion.jobs.run(survivors[0], ["sh", "-c", "sleep 4; echo alive"])
        time.sleep(0.5)
        # SIGKILL of every Ray process of the node: its raylet, its workers, the agent.
        cluster.kill("w2")
        killed = time.monotonic()
        while bastion.sessions.get(doomed)["status"] != "deleted":
            assert time.monotonic() - killed < 3.0, "the lost node was not noticed in 3 s"
            time.sleep(0.1)
        lost = bastion.sessions.get(doomed)
        assert lost["status_reason"] is not None and lost["status_reason"].startswith("lost:")
        job = bastion.jobs.get(doomed, running["job_id"])
        assert job["status"] == "failed" and job["failure_reason"] == "node_lost"
        # The other nodes' sessions run on, untouched, their jobs too.
        survived = bastion.jobs.wait(survivors[0], survivor_job["job_id"], timeout=30)
        assert survived["output"]["console_output"] == "alive\n"
        for sid in survivors:
            assert bastion.sessions.get(sid)["status"] == "running"
        # The snapshot went with its node: nothing can start from it meanwhile.
        with pytest.raises(SessionStartError, match="w2, which left the cluster"):
            bastion.sessions.create(snapshot=snap)

        # The node comes back under its name: nothing of the lost session is left on it.
        cluster.add("w2")
        leftover = data_root / "gw" / "nodes" / "w2" / "sessions" / doomed
        deadline = time.monotonic() + 60
        while leftover.exists():
            assert time.monotonic() < deadline, "the lost session's sandbox was left on w2"
            time.sleep(0.5)
        sid = bastion.sessions.create()["session_id"]
        assert bastion.sessions.start(sid)["node"] == "w2"  # the emptiest again
        # Its snapshots came back with it (they outlive their sessions).
        copy = bastion.sessions.create(snapshot=snap)["session_id"]
        assert bastion.sessions.start(copy)["node"] == "w2"
        result = bastion.jobs.run_and_wait(copy, ["cat", "/home/user/w2-state"])
        assert result["output"]["console_output"] == "kept\n"
        bastion.sessions.delete(copy)
        bastion.snapshots.delete(snap)


def test_a_node_gone_while_the_gateway_was_down_has_its_sessions_lost(
    cluster: LocalRayCluster, gateway: ServerProcess, data_root: Path
) -> None:
    # The store's node column is where the next gateway finds each session: one on a
    # node that died while no gateway ran is lost (as above), not taken for stopped.
    with Bastion(base_url=gateway.url) as bastion:
        on_w2 = [s for s in bastion.sessions.list()["sessions"] if s["node"] == "w2"]
        assert on_w2, "the test before leaves a session on w2"
        doomed = on_w2[0]["session_id"]
        assert bastion.sessions.get(doomed)["status"] == "running"
        running = bastion.jobs.run(doomed, ["sleep", "600"])["job_id"]
        kept = {
            s["session_id"]: s["status"]
            for s in bastion.sessions.list()["sessions"]
            if s["node"] != "w2"
        }
    gateway.stop(signal.SIGKILL)
    cluster.kill("w2")
    time.sleep(3)  # Ray's health checks declare it dead (about 2 s)
    gateway.start(timeout=180)
    with Bastion(base_url=gateway.url) as bastion:
        lost = bastion.sessions.get(doomed)
        assert lost["status"] == "deleted", lost
        assert lost["status_reason"] is not None and lost["status_reason"].startswith("lost:")
        assert "w2" in lost["status_reason"]
        job = bastion.jobs.get(doomed, running)  # its end seen by no gateway: the node's
        assert job["status"] == "failed" and job["failure_reason"] == "node_lost", job
        assert kept and {sid: bastion.sessions.get(sid)["status"] for sid in kept} == kept
        # The node comes back: the lost session's sandbox, still running on this one
        # machine (a real node's died with it), is removed.
        cluster.add("w2")
        leftover = data_root / "gw" / "nodes" / "w2" / "sessions" / doomed
        deadline = time.monotonic() + 60
        while leftover.exists():
            assert time.monotonic() < deadline, "the lost session's sandbox was left on w2"
            time.sleep(0.5)
