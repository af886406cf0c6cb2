"""The OCI backend's ``config.json`` (runtime/oci/spec.py), rule by rule, without a host.

Each test names one thing the sandbox is denied or given; a change to the builder that
loosens one of them fails here before any real sandbox runs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from bastion_server.runtime import agent_protocol, seccomp
from bastion_server.runtime.oci import spec
from bastion_server.runtime.oci.spec import SandboxSpec, mount_points, sandbox_config

SPEC = SandboxSpec(
    rootfs="/data/sessions/s1/rootfs",
    share_dir="/run/bastion/tag/share",
    resolv_conf="/run/bastion/tag/share/resolv.conf",
    run_dir="/data/sessions/s1/run",
    agent="bastion-agent",
    id_base=3_000_000,
    sandbox_uid=1000,
    sandbox_gid=1000,
    home="/home/user",
    cgroup="/bastion/tag/s1",
    memory_mb=512,
    pids=256,
    cpus=1.5,
    nofile_hard=1_048_576,
    userns="/proc/1234/ns/user",
)


def _config(**changes: Any) -> dict[str, Any]:
    return sandbox_config(dataclasses.replace(SPEC, **changes))


def _mount(config: dict[str, Any], destination: str) -> dict[str, Any]:
    (found,) = [m for m in config["mounts"] if m["destination"] == destination]
    return dict(found)


def test_the_config_is_plain_json() -> None:
    config = _config()
    assert json.loads(json.dumps(config)) == config
    assert config["ociVersion"] == "1.0.2"


def test_every_namespace_is_the_sandboxs_own() -> None:
    types = [ns["type"] for ns in _config()["linux"]["namespaces"]]
    assert sorted(types) == sorted(["user", "pid", "network", "ipc", "uts", "mount", "cgroup"])


@pytest.mark.parametrize("userns", ["/proc/1234/ns/user", None])
def test_the_user_namespace_is_joined_or_made(userns: str | None) -> None:
    (user,) = [ns for ns in _config(userns=userns)["linux"]["namespaces"] if ns["type"] == "user"]
    assert user == ({"type": "user", "path": userns} if userns else {"type": "user"})


def test_ids_map_onto_the_sessions_own_range_only() -> None:
    linux = _config()["linux"]
    expected = [{"containerID": 0, "hostID": 3_000_000, "size": spec.ID_RANGE}]
    assert linux["uidMappings"] == expected
    assert linux["gidMappings"] == expected


def test_the_agent_is_pid_1_as_the_namespaces_root_without_new_privileges() -> None:
    process = _config()["process"]
    assert process["user"] == {"uid": 0, "gid": 0}
    assert process["args"] == [f"{spec.AGENT_DIR_IN_SANDBOX}/bastion-agent"]
    assert process["noNewPrivileges"] is True
    assert process["terminal"] is False
    assert "BASTION_UID=1000" in process["env"]
    assert "BASTION_HOME=/home/user" in process["env"]
    assert f"BASTION_SOCKET_DIR={agent_protocol.SOCKET_DIR}" in process["env"]


def test_capabilities_are_the_agents_few_in_every_set() -> None:
    caps = _config()["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for name in caps:
        assert caps[name] == list(spec.AGENT_CAPABILITIES)
    assert "CAP_SYS_ADMIN" not in spec.AGENT_CAPABILITIES
    assert "CAP_NET_ADMIN" not in spec.AGENT_CAPABILITIES


def test_rlimits_cap_open_files_and_forbid_core_dumps() -> None:
    rlimits = {r["type"]: r for r in _config()["process"]["rlimits"]}
    assert rlimits["RLIMIT_NOFILE"] == {
        "type": "RLIMIT_NOFILE",
        "hard": spec.MAX_NOFILE,
        "soft": spec.MAX_NOFILE,
    }
    assert rlimits["RLIMIT_CORE"]["hard"] == rlimits["RLIMIT_CORE"]["soft"] == 0


def test_open_files_never_exceed_the_servers_own_hard_limit() -> None:
    rlimits = {r["type"]: r for r in _config(nofile_hard=1024)["process"]["rlimits"]}
    assert rlimits["RLIMIT_NOFILE"]["hard"] == rlimits["RLIMIT_NOFILE"]["soft"] == 1024


def test_resources_are_the_sessions_limits() -> None:
    resources = _config()["linux"]["resources"]
    assert resources["memory"] == {"limit": 512 * 1024 * 1024, "swap": 512 * 1024 * 1024}
    assert resources["pids"] == {"limit": 256}
    assert resources["cpu"] == {"quota": 150_000, "period": 100_000}
    assert resources["devices"] == [{"allow": False, "access": "rwm"}]
    assert _config()["linux"]["cgroupsPath"] == "/bastion/tag/s1"


def test_the_seccomp_filter_is_the_sandbox_profile() -> None:
    seccomp_config = _config()["linux"]["seccomp"]
    assert seccomp_config == seccomp.profile()
    assert seccomp_config["defaultAction"] == "SCMP_ACT_ERRNO"


def test_kernel_information_is_masked_and_proc_knobs_read_only() -> None:
    linux = _config()["linux"]
    for path in ("/proc/kcore", "/proc/keys", "/sys/firmware", "/sys/block", "/sys/dev/block"):
        assert path in linux["maskedPaths"]
    for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs"):
        assert path in linux["readonlyPaths"]


def test_the_root_is_the_sessions_overlay() -> None:
    config = _config()
    assert config["root"] == {"path": "/data/sessions/s1/rootfs", "readonly": False}
    assert config["hostname"] == "sandbox"


def test_kernel_filesystems_are_mounted_without_suid_exec_or_devices() -> None:
    config = _config()
    for destination in ("/proc", "/dev/shm", "/dev/mqueue", "/sys"):
        options = _mount(config, destination)["options"]
        assert {"nosuid", "noexec", "nodev"} <= set(options), destination
    assert "ro" in _mount(config, "/sys")["options"]
    assert "nosuid" in _mount(config, "/dev")["options"]
    assert "newinstance" in _mount(config, "/dev/pts")["options"]


def test_the_share_is_bound_read_only_and_the_socket_dir_read_write() -> None:
    config = _config()
    agent = _mount(config, spec.AGENT_DIR_IN_SANDBOX)
    assert agent["source"] == "/run/bastion/tag/share"
    assert "ro" in agent["options"]
    resolv = _mount(config, "/etc/resolv.conf")
    assert resolv["source"] == "/run/bastion/tag/share/resolv.conf"
    assert {"ro", "noexec"} <= set(resolv["options"])
    run = _mount(config, agent_protocol.SOCKET_DIR)
    assert run["source"] == "/data/sessions/s1/run"
    assert {"rw", "noexec", "nosuid", "nodev"} <= set(run["options"])


def test_mount_points_are_every_mounts_destination() -> None:
    assert mount_points() == tuple(m["destination"] for m in _config()["mounts"])
    assert "/proc" in mount_points()
    assert spec.AGENT_DIR_IN_SANDBOX in mount_points()


def test_two_builds_share_no_mutable_state() -> None:
    first = _config()
    first["linux"]["uidMappings"][0]["hostID"] = 0
    first["process"]["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    second = _config()
    assert second["linux"]["uidMappings"][0]["hostID"] == 3_000_000
    assert second["linux"]["gidMappings"][0]["hostID"] == 3_000_000
    assert "CAP_SYS_ADMIN" not in second["process"]["capabilities"]["bounding"]
