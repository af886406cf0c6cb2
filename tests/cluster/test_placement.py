"""Placement of new sessions on a cluster's nodes (pure: no Ray)."""

from __future__ import annotations

import pytest

from bastion_server.cluster.placement import ImageOnNoNode, NoCapacity, NodeLoad, choose_node


def node(name: str, sessions: int = 0, memory: int = 4096, ready: bool = True) -> NodeLoad:
    return NodeLoad(name, ready, sessions, memory)


def test_the_node_with_fewest_sessions_wins() -> None:
    assert choose_node([node("a", 3), node("b", 1), node("c", 2)], 512) == "b"


def test_equal_sessions_go_to_the_most_available_memory() -> None:
    assert choose_node([node("a", 1, 2048), node("b", 1, 8192)], 512) == "b"


def test_a_full_tie_is_broken_by_name_every_time() -> None:
    assert choose_node([node("b"), node("a"), node("c")], 512) == "a"


def test_a_node_without_the_memory_is_passed_over() -> None:
    assert choose_node([node("a", 0, 256), node("b", 5, 4096)], 512) == "b"


def test_a_node_not_ready_is_passed_over() -> None:
    assert choose_node([node("a", 0, ready=False), node("b", 9)], 512) == "b"


def test_no_node_fits() -> None:
    with pytest.raises(NoCapacity, match="1024 MiB"):
        choose_node([node("a", memory=512), node("b", memory=700)], 1024)


def test_no_node_ready_or_none_at_all() -> None:
    with pytest.raises(NoCapacity, match="ready"):
        choose_node([node("a", ready=False)], 512)
    with pytest.raises(NoCapacity, match="no node"):
        choose_node([], 512)


def test_only_nodes_that_hold_the_image_are_candidates() -> None:
    loads = [
        NodeLoad("a", True, 0, 4096, frozenset({"sha256:base"})),
        NodeLoad("b", True, 7, 4096, frozenset({"sha256:base", "sha256:tools"})),
    ]
    assert choose_node(loads, 512, ("tools", "sha256:tools")) == "b"
    assert choose_node(loads, 512, ("default", "sha256:base")) == "a"
    assert choose_node(loads, 512, None) == "a"  # each node's default image


def test_an_image_no_node_holds_is_a_clear_error() -> None:
    loads = [NodeLoad("a", True, 0, 4096, frozenset({"sha256:base"}))]
    with pytest.raises(ImageOnNoNode, match=r"holds image 'tools' \(sha256:tools\)"):
        choose_node(loads, 512, ("tools", "sha256:tools"))
