"""``bastion keys``: make, list and revoke the server's API keys (admin keys only)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, cast

from ..wire import KeyScope, KeyScopeName
from .common import add_command, add_group, json_mode, print_lines, table_width, to_stderr
from .errors import ExitCode
from .format import format_time_ago, table, write_json

if TYPE_CHECKING:
    from .._client import Bastion
    from .common import Subparsers


def add_keys_command(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:

    actions = add_group(
        subparsers,
        "keys",
        help="make, list and revoke API keys (admin)",
        description="Manage the server's API keys; needs an admin key. A key's scope is "
        "admin (everything, keys included), agent (its sessions, jobs, files and "
        "terminals) or viewer (only reads of them). The server keeps only a hash of each "
        "key: the key is printed once, when it is made.",
        examples=[
            "bastion keys create --scope agent --name ci",
            "bastion keys list",
            "bastion keys revoke ci",
        ],
    )
    create = add_command(
        actions,
        "create",
        help="make a key (printed once)",
        description="Make an API key and print it, this once. With --tenant it works on "
        "that key's sessions (a viewer of an agent's sessions, or a key rotated in); "
        "else on sessions of its own.",
        examples=[
            "bastion keys create --scope agent --name ci",
            "bastion keys create --scope viewer --tenant key_0123456789abcdef01234567",
            "KEY=$(bastion keys create --scope agent -q)",
        ],
        parents=common,
    )
    create.add_argument(
        "--scope", required=True, choices=[s.value for s in KeyScope], help="what it may do"
    )
    create.add_argument("--name", help="a unique name, to revoke it by")
    create.add_argument(
        "--tenant", metavar="KEY_ID", help="work on the sessions of this key (its key_id)"
    )
    create.add_argument("-q", "--quiet", action="store_true", help="print only the key")
    create.set_defaults(runner=_keys_create)

    list_ = add_command(
        actions,
        "list",
        help="list the keys (never the keys themselves)",
        description="List the server's keys: the configured ones (--api-key) and the made "
        "ones, revoked ones too.",
        examples=["bastion keys list", "bastion keys list --json"],
        parents=common,
    )
    list_.set_defaults(runner=_keys_list)

    revoke = add_command(
        actions,
        "revoke",
        help="revoke a made key",
        description="Revoke a made key by its id or name: it is refused from its next "
        "request on. The sessions it made are kept.",
        examples=["bastion keys revoke ci", "bastion keys revoke key_0123456789abcdef01234567"],
        parents=common,
    )
    revoke.add_argument("key", metavar="KEY", help="the key's id (key_...) or name")
    revoke.set_defaults(runner=_keys_revoke)


def _keys_create(client: Bastion, args: argparse.Namespace) -> int:

    made = client.keys.create(cast(KeyScopeName, args.scope), name=args.name, tenant=args.tenant)
    if json_mode(args):
        write_json(sys.stdout, made)
    elif args.quiet:
        print_lines([made["api_key"]])
    else:
        print_lines([made["api_key"]])
        to_stderr(
            f"made {made['scope']} key {made['key_id']}"
            + (f" ({made['name']})" if made["name"] else "")
            + ": the line above is the key, shown this once; keep it secret"
        )
    return ExitCode.OK


def _keys_list(client: Bastion, args: argparse.Namespace) -> int:

    result = client.keys.list()
    if json_mode(args):
        write_json(sys.stdout, result)
        return ExitCode.OK
    rows = [
        [
            k["key_id"],
            k["name"] or "-",
            k["scope"],
            "own" if k["tenant"] == k["key_id"] else k["tenant"],
            k["source"],
            format_time_ago(k["created_at"]) if k["created_at"] else "-",
            "revoked " + format_time_ago(k["revoked_at"]) if k["revoked_at"] else "live",
        ]
        for k in result["keys"]
    ]
    if not rows:
        to_stderr("no keys")
        return ExitCode.OK
    print_lines(
        table(
            ["KEY", "NAME", "SCOPE", "TENANT", "SOURCE", "CREATED", "STATE"],
            rows,
            max_width=table_width(),
        )
    )
    return ExitCode.OK


def _keys_revoke(client: Bastion, args: argparse.Namespace) -> int:

    info = client.keys.revoke(args.key)
    if json_mode(args):
        write_json(sys.stdout, info)
    else:
        print_lines([f"{info['key_id']}  revoked"])
    return ExitCode.OK
