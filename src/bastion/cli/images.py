"""``bastion images``: build images from recipes (live log), list, show, delete them."""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import add_command, add_group, json_mode, print_lines, table_width, to_stderr
from .errors import ExitCode
from .format import details, format_size, format_time_ago, table, write_json

if TYPE_CHECKING:
    from .._client import Bastion
    from ..wire import ImageInfo
    from .common import Subparsers


def add_images_command(subparsers: Subparsers, common: list[argparse.ArgumentParser]) -> None:
    actions = add_group(
        subparsers,
        "images",
        help="build, list, show and delete images",
        description="Images are what sessions run (bastion sessions create --image NAME). "
        "A recipe (TOML: name, from, apt, pip, npm, run, env, workdir, [files]) is built in "
        "a sandbox on the server and stored as a layer over its 'from' image; the same "
        "recipe builds once. An image a key builds is its own; stock images and an admin "
        "key's are shared.",
        examples=[
            "bastion images build -f judge.toml",
            "bastion images build python",
            "bastion images list",
            "bastion images import app app.tar",
            "bastion images pull app localhost:5000/app:1",
            "bastion images delete judge",
        ],
    )
    build = add_command(
        actions,
        "build",
        help="build a recipe (its log live)",
        description="Build the recipe of a TOML file (-f; its [files] are read from paths "
        "relative to the file), or a stock recipe by name (python, build), printing the "
        "build's log as it runs. Exits 1 if a step fails.",
        examples=["bastion images build -f judge.toml", "bastion images build python"],
        parents=common,
    )
    build.add_argument("stock", nargs="?", metavar="NAME", help="a stock recipe's name")
    build.add_argument("-f", "--file", type=Path, help="a TOML recipe file")
    build.add_argument("--no-cache", action="store_true", help="build even if stored")
    build.add_argument("-q", "--quiet", action="store_true", help="no log, only the result")
    build.set_defaults(runner=_images_build)

    import_ = add_command(
        actions,
        "import",
        help="import an OCI image archive",
        description="Import a docker save / podman save archive or an OCI layout tarball "
        "(- reads standard input) as an image of this key, printing the server's progress "
        "as it unpacks it. Exits 1 if it cannot be unpacked.",
        examples=[
            "bastion images import app app.tar",
            "docker save app:1 | bastion images import app -",
        ],
        parents=common,
    )
    import_.add_argument("name", metavar="NAME", help="the image's name here")
    import_.add_argument("archive", metavar="ARCHIVE", help="the archive file, or - for stdin")
    import_.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    import_.set_defaults(runner=_images_import)

    pull = add_command(
        actions,
        "pull",
        help="pull an image from a registry",
        description="Pull an image from a registry (the server fetches it) as NAME, "
        "printing the server's progress. Exits 1 if the pull fails.",
        examples=["bastion images pull app localhost:5000/app:1"],
        parents=common,
    )
    pull.add_argument("name", metavar="NAME", help="the image's name here")
    pull.add_argument("ref", metavar="REF", help="registry[:port]/repository[:tag]")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress, only the result")
    pull.set_defaults(runner=_images_pull)

    list_ = add_command(
        actions,
        "list",
        help="list the images the key may use",
        description="List the key's own images and the shared ones.",
        examples=["bastion images list", "bastion images list --json"],
        parents=common,
    )
    list_.set_defaults(runner=_images_list)

    show = add_command(
        actions,
        "show",
        help="show one image",
        description="Show an image's status, digest, base and size (and why a build failed).",
        examples=["bastion images show judge", "bastion images show judge --log"],
        parents=common,
    )
    show.add_argument("name", metavar="NAME")
    show.add_argument("--log", action="store_true", help="print its build log too")
    show.set_defaults(runner=_images_show)

    delete = add_command(
        actions,
        "delete",
        help="delete an image",
        description="Delete an image; refused while sessions run it or images are built over it.",
        examples=["bastion images delete judge"],
        parents=common,
    )
    delete.add_argument("name", metavar="NAME")
    delete.set_defaults(runner=_images_delete)


def read_recipe_file(path: Path) -> dict[str, Any]:
    """A TOML recipe with each ``[files]`` value (a path, relative to the recipe's
    directory) replaced by that file's bytes."""
    with path.open("rb") as f:
        recipe = tomllib.load(f)
    files = recipe.get("files")
    if isinstance(files, dict):
        recipe["files"] = {
            target: (path.parent / source).read_bytes() if isinstance(source, str) else source
            for target, source in files.items()
        }
    return recipe


def _images_build(client: Bastion, args: argparse.Namespace) -> int:
    if (args.file is None) == (args.stock is None):
        to_stderr("bastion: name a stock recipe or give -f RECIPE.toml (one of them)")
        return ExitCode.USAGE
    recipe: dict[str, Any] | str
    if args.file is not None:
        try:
            recipe = read_recipe_file(args.file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            to_stderr(f"bastion: cannot read the recipe {args.file}: {exc}")
            return ExitCode.USAGE
    else:
        recipe = args.stock
    info = client.images.build(recipe, on_log=_progress(args), no_cache=args.no_cache)
    _print_result(info, args)
    return ExitCode.OK


def _progress(args: argparse.Namespace) -> Callable[[str], None] | None:
    """Where a build's, import's or pull's log goes as it is written: standard error,
    unless -q or --json."""
    if args.quiet or json_mode(args):
        return None

    def on_log(text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()

    return on_log


def _print_result(info: ImageInfo, args: argparse.Namespace) -> None:
    if json_mode(args):
        write_json(sys.stdout, info)
    else:
        print_lines([f"{info['name']}  {info['status']}  {info['digest']}"])


def _images_import(client: Bastion, args: argparse.Namespace) -> int:
    on_log = _progress(args)
    if args.archive == "-":
        info = client.images.import_archive(args.name, sys.stdin.buffer, on_log=on_log)
    else:
        with open(args.archive, "rb") as archive:
            info = client.images.import_archive(args.name, archive, on_log=on_log)
    _print_result(info, args)
    return ExitCode.OK


def _images_pull(client: Bastion, args: argparse.Namespace) -> int:
    _print_result(client.images.pull(args.name, args.ref, on_log=_progress(args)), args)
    return ExitCode.OK


def _image_row(i: ImageInfo) -> list[str]:
    return [
        i["name"],
        i["status"],
        i["source"],
        "shared" if i["shared"] else "own",
        i["parent"] or "-",
        format_size(i["size_bytes"]) if i["size_bytes"] else "-",
        (i["digest"] or "-")[:19],
        format_time_ago(i["updated_at"]),
    ]


def _images_list(client: Bastion, args: argparse.Namespace) -> int:
    images = client.images.list()
    if json_mode(args):
        write_json(sys.stdout, {"images": images})
        return ExitCode.OK
    headers = ["NAME", "STATUS", "SOURCE", "OWNER", "FROM", "SIZE", "DIGEST", "UPDATED"]
    print_lines(table(headers, [_image_row(i) for i in images], max_width=table_width()))
    return ExitCode.OK


def _images_show(client: Bastion, args: argparse.Namespace) -> int:
    info = client.images.get(args.name)
    if json_mode(args):
        write_json(sys.stdout, info)
    else:
        print_lines(
            details(
                [
                    ("name", info["name"]),
                    ("status", info["status"]),
                    *([("reason", info["status_reason"])] if info["status_reason"] else []),
                    ("source", info["source"]),
                    ("shared", "yes" if info["shared"] else "no (this key's)"),
                    ("from", info["parent"] or "-"),
                    ("digest", info["digest"] or "-"),
                    ("size", format_size(info["size_bytes"])),
                    ("updated", format_time_ago(info["updated_at"])),
                ]
            )
        )
    if args.log:
        sys.stdout.write(client.images.log(args.name))
    return ExitCode.OK


def _images_delete(client: Bastion, args: argparse.Namespace) -> int:
    info = client.images.delete(args.name)
    if json_mode(args):
        write_json(sys.stdout, info)
    else:
        print_lines([f"{info['name']}  deleted"])
    return ExitCode.OK
