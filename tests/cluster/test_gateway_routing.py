"""Where the gateway sends what (ClusterRuntime over stand-in agents, no Ray): a
session given a snapshot goes to the snapshot's node, a build to the gateway's own
node, a session to a node that holds its image; a snapshot on a node away is kept."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bastion.wire import ErrorCode
from bastion_server.cluster.gateway_runtime import (
    ClusterRuntime,
    ImageOnNoReadyNode,
    Node,
    NodeLost,
    SnapshotOnAnotherNode,
)
from bastion_server.config import ServerConfig
from bastion_server.runtime.base import SandboxError, SandboxLimits
from bastion_server.runtime.sandbox_image import SandboxImage

LIMITS = SandboxLimits(memory_mb=256, pids=64, cpus=1.0, disk_mb=128)
TOOLS = SandboxImage(layers=("/img/tools",), uid_shift=0, sandbox_uid=1000, sandbox_gid=1000,
                     home="/home/user", name="tools", digest="sha256:tools")  # fmt: skip


class Agent:
    """A node agent's calls as Ray hands them out (``agent.method.remote(...)``)."""

    def __init__(self, sessions: int = 0, images: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.sessions, self.images = sessions, images

    def __getattr__(self, method: str) -> Any:
        agent = self

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                agent.calls.append((method, *args))
                return agent.answer(method)

        return Remote

    async def answer(self, method: str) -> Any:
        if method == "load":
            return {"sessions": self.sessions, "memory_available_mb": 4096,
                    "images": list(self.images)}  # fmt: skip
        return 0 if method == "capture" else None


def cluster(tmp_path: Path, **agents: Agent) -> ClusterRuntime:
    runtime = ClusterRuntime("local", ServerConfig(data_dir=tmp_path))
    for name, agent in agents.items():
        runtime.nodes[name] = Node(name, f"id-{name}", agent, ready=True)
    runtime._own_ray_id = "id-head"
    return runtime


def methods(agent: Agent) -> list[str]:
    return [c[0] for c in agent.calls if c[0] != "load"]


def run(test: Callable[[], Any]) -> None:
    asyncio.run(test())


def test_a_session_given_a_snapshot_of_another_node_is_made_there(tmp_path: Path) -> None:
    a, b = Agent(sessions=5), Agent(sessions=0)
    rt = cluster(tmp_path, a=a, b=b)

    async def test() -> None:
        await rt.create("ses_src", LIMITS)  # b: the emptiest
        b.sessions = 9
        await rt.capture("ses_src", "snap_1")  # on b
        await rt.create("ses_copy", LIMITS, None, ["snap_1"])  # a by load, b by snapshot
        assert rt.node_of("ses_copy") == "b"
        assert methods(a) == []  # nothing made there first
        assert b.calls[-1] == ("create", "ses_copy", LIMITS, None, False, ["snap_1"])

    run(test)


def test_a_session_that_ran_takes_only_a_snapshot_of_its_node(tmp_path: Path) -> None:
    a, b = Agent(sessions=0), Agent(sessions=1)
    rt = cluster(tmp_path, a=a, b=b)

    async def test() -> None:
        await rt.create("ses_1", LIMITS)  # a
        await rt.start("ses_1", LIMITS)
        rt._snapshots["snap_b"] = "b"
        for refusal in (rt.check_layers, rt.set_layers):
            with pytest.raises(SnapshotOnAnotherNode, match="only take a snapshot of its own"):
                await refusal("ses_1", ["snap_b"])
        assert methods(a) == ["create", "start"] and methods(b) == []
        assert SnapshotOnAnotherNode.code == ErrorCode.SNAPSHOT_STATE
        rt._snapshots["snap_a"] = "a"
        await rt.check_layers("ses_1", ["snap_a"])

    run(test)


def test_a_snapshot_on_a_node_away_is_kept_for_later(tmp_path: Path) -> None:
    a = Agent()
    rt = cluster(tmp_path, a=a)
    rt._snapshots["snap_1"] = "a"
    rt.nodes["a"].alive = False

    async def test() -> None:
        with pytest.raises(NodeLost, match="left the cluster"):
            await rt.remove_snapshot("snap_1")
        assert rt._snapshots == {"snap_1": "a"}  # the next collection retries
        with pytest.raises(SandboxError, match="no node of the cluster holds snapshot"):
            rt._snapshot_node("snap_unknown")

    run(test)


def test_a_session_of_an_image_goes_to_a_node_that_holds_it(tmp_path: Path) -> None:
    a, b = Agent(sessions=0), Agent(sessions=7, images=("sha256:tools",))
    rt = cluster(tmp_path, a=a, b=b)

    async def test() -> None:
        await rt.create("ses_1", LIMITS, TOOLS)
        assert rt.node_of("ses_1") == "b"
        a.images = b.images = ()
        with pytest.raises(ImageOnNoReadyNode, match=r"holds image 'tools' \(sha256:tools\)"):
            await rt.create("ses_2", LIMITS, TOOLS)
        assert ImageOnNoReadyNode.code == ErrorCode.IMAGE_STATE

    run(test)


def test_an_image_build_runs_on_the_gateways_own_node(tmp_path: Path) -> None:
    head, w1 = Agent(sessions=9), Agent(sessions=0)
    rt = cluster(tmp_path, head=head, w1=w1)

    async def test() -> None:
        rt.private.add("build_1")
        await rt.create("build_1", LIMITS)
        assert rt.node_of("build_1") == "head"
        assert head.calls[-1] == ("create", "build_1", LIMITS, None, True, [])
        rt.nodes["head"].ready = False
        rt.private.add("build_2")
        with pytest.raises(SandboxError, match="gateway's own node"):
            await rt.create("build_2", LIMITS)

    run(test)


def test_the_stores_nodes_route_and_a_node_gone_since_has_its_sessions_lost(
    tmp_path: Path,
) -> None:
    a, b = Agent(), Agent()
    rt = cluster(tmp_path, a=a, b=b)
    rt._where = {"ses_a": "a", "ses_moved": "b"}  # what the agents listed at the join
    lost: list[tuple[str, str]] = []

    async def listener(session_id: str, reason: str) -> None:
        lost.append((session_id, reason))

    rt.lost_listeners.append(listener)

    async def test() -> None:
        await rt.adopt_placements(
            {"ses_a": "a", "ses_moved": "a", "ses_quiet": "b", "ses_gone": "c", "ses_gone2": "c"}
        )
        assert lost == [
            ("ses_gone", "lost: its node c left the cluster"),
            ("ses_gone2", "lost: its node c left the cluster"),
        ]
        assert rt.node_of("ses_moved") == "b"  # the agent has its sandbox
        assert rt.node_of("ses_quiet") == "b"  # no agent listed it: the store's word
        assert rt.node_of("ses_gone") is None
        await rt.stop("ses_quiet")
        assert methods(b) == ["stop"]
        await rt._lose("b")  # b dies: its sessions are found through the store's column too
        assert [sid for sid, _ in lost[2:]] == ["ses_moved", "ses_quiet"]

    run(test)


def test_an_agent_that_reports_a_session_elsewhere_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = cluster(tmp_path, a=Agent())
    rt._where["ses_1"] = "a"
    rt._reported("ses_1", "b")
    assert rt.node_of("ses_1") == "b"
    assert "session found on another node than recorded" in caplog.text
