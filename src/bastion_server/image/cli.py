"""The ``bastion image`` commands: ``build`` and ``show``.

The SDK's ``bastion`` CLI finds :func:`register` through the ``bastion.commands`` entry
point; ``python -m bastion_server.image`` offers the same commands on their own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bastion_server.image.builder import (
    IMAGES_DIR_ENV,
    MANIFEST_NAME,
    MIRROR_ENV,
    RECIPES,
    ImageError,
    build_image,
    default_images_dir,
    resolve_image,
)
from bastion_server.runtime import agent_build

# argparse's type for the object add_subparsers() returns is private.
_SubParsers = argparse._SubParsersAction  # pyright: ignore[reportPrivateUsage]


def register(subparsers: _SubParsers[argparse.ArgumentParser]) -> None:
    """Add ``image build`` and ``image show`` to a ``bastion`` CLI's sub-commands."""
    image = subparsers.add_parser("image", help="build or show the sandbox root filesystem image")
    _add_commands(image.add_subparsers(dest="image_command", metavar="COMMAND", required=True))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bastion_server.image``."""
    parser = argparse.ArgumentParser(
        prog="python -m bastion_server.image",
        description="Build or show the sandbox root filesystem image.",
    )
    _add_commands(parser.add_subparsers(dest="image_command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def _add_commands(commands: _SubParsers[argparse.ArgumentParser]) -> None:
    build = commands.add_parser(
        "build",
        help="build the image and the sandbox agent unless already built (needs root; "
        "~40 s the first time)",
        description="Build the sandbox agent (gcc, static libc) and the sandbox image "
        "(debootstrap), each unless a build of the current source or recipe is there.",
    )
    _add_common(build)
    build.add_argument(
        "--force", action="store_true", help="rebuild even if the image is already built"
    )
    build.add_argument(
        "--mirror",
        default=None,
        help=f"Debian mirror for debootstrap (default: ${MIRROR_ENV}, else deb.debian.org)",
    )
    build.set_defaults(func=_build)

    show = commands.add_parser("show", help="print the built image's manifest")
    _add_common(show)
    show.add_argument("--json", action="store_true", help="print the manifest as JSON")
    show.set_defaults(func=_show)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images-dir",
        type=Path,
        default=None,
        help=f"where images live (default: ${IMAGES_DIR_ENV}, else /var/lib/bastion/images)",
    )
    parser.add_argument("--name", default="default", choices=sorted(RECIPES), help="image name")


def _build(args: argparse.Namespace) -> int:
    images_dir: Path = args.images_dir or default_images_dir()
    # The agent every sandbox runs as PID 1 is set-up too: built here first (seconds,
    # and a missing compiler shows before the image's minute), as `make setup` does.
    try:
        agent_build.set_up(_print_progress)
    except agent_build.AgentBuildError as exc:
        print(f"bastion image build: error: {exc}", file=sys.stderr)
        return 1
    try:
        build_image(
            images_dir,
            RECIPES[args.name],
            progress=_print_progress,
            force=args.force,
            mirror=args.mirror,
        )
    except ImageError as exc:
        print(f"bastion image build: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bastion image build: interrupted; nothing was installed", file=sys.stderr)
        return 130
    return 0


def _show(args: argparse.Namespace) -> int:
    images_dir: Path = args.images_dir or default_images_dir()
    try:
        info = resolve_image(images_dir, args.name)
    except ImageError as exc:
        print(f"bastion image show: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        manifest = json.loads((info.path / MANIFEST_NAME).read_text())
        where = {"path": str(info.path), "rootfs": str(info.rootfs)}
        print(json.dumps({**where, **manifest}, indent=2))
        return 0
    user = f"{info.sandbox_user} ({info.sandbox_uid}:{info.sandbox_gid})"
    last = info.id_map_size - 1
    rows = [
        ("image", info.path.name),
        ("rootfs", str(info.rootfs)),
        ("built at", info.built_at),
        ("user", f"{user}, home {info.home}, shell {info.shell}"),
        ("id map", f"0..{last} -> {info.uid_shift}..{info.uid_shift + last}"),
    ]
    for label, value in rows:
        print(f"{label + ':':<10} {value}")
    return 0


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
