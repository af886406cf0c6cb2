"""DebootstrapProgress: debootstrap's --debian-installer protocol to a few lines."""

from __future__ import annotations

from bastion_server.image.builder import DebootstrapProgress


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(parser: DebootstrapProgress, text: str) -> None:
    for line in text.strip().splitlines():
        parser.feed(line.strip())


def test_one_line_per_phase_then_throttled_updates() -> None:
    lines: list[str] = []
    clock = Clock()
    parser = DebootstrapProgress(lines.append, interval=2.0, clock=clock)

    feed(
        parser,
        """
        P: 0 100 DOWNREL
        PF: Downloading Release file
        I: RETRIEVING
        IA: Release
        IF: Retrieving %s
        P: 100 100
        P: 100 100 DOWNREL
        P: 0 100 DOWNRELSIG
        P: 0 1 SIZEDEBS
        P: 3 3 SIZEDEBS
        P: 0 43616904 DOWNDEBS
        PF: Downloading packages
        I: RETRIEVING
        IA: adduser
        P: 5305044 43616904
        """,
    )
    clock.now = 2.5
    feed(parser, "I: RETRIEVING\nIA: apt\nP: 46683 43616904")  # byte counts go back
    clock.now = 3.0
    feed(parser, "I: RETRIEVING")  # within the interval: not shown
    feed(parser, "P: 1 88 EXTRACTPKGS\nPF: Extracting packages\nP: 2 88 EXTRACTPKGS")
    clock.now = 6.0
    feed(parser, "P: 44 88 EXTRACTPKGS\nP: 40 88 EXTRACTPKGS")
    clock.now = 9.0
    feed(parser, "P: 40 88 EXTRACTPKGS\nP: 1 31 CONFBASE")

    assert lines == [
        "[image] debootstrap: fetching release index",
        "[image] debootstrap: resolving packages",
        "[image] debootstrap: downloading packages (3 packages, 43.6 MB)",
        "[image] debootstrap: downloading packages 2/3",
        "[image] debootstrap: extracting packages 1/88",
        "[image] debootstrap: extracting packages 44/88",
        "[image] debootstrap: configuring base packages 1/31",
    ]
    assert parser.errors == []


def test_errors_are_collected_and_warnings_reported() -> None:
    lines: list[str] = []
    parser = DebootstrapProgress(lines.append)

    feed(
        parser,
        """
        W: RETRYING
        WA: http://deb.debian.org/debian/dists/bookworm/InRelease
        WF: Retrying failed download of %s
        E: COULDNTDL
        EA: libc6
        EF: Couldn't download package %s (ver %s)
        """,
    )

    assert parser.errors == ["Couldn't download package libc6 (ver ?)"]
    assert lines == [
        "[image] debootstrap warning: Retrying failed download of "
        "http://deb.debian.org/debian/dists/bookworm/InRelease",
        "[image] debootstrap error: Couldn't download package libc6 (ver ?)",
    ]


def test_unknown_phases_and_garbage_do_not_break_it() -> None:
    lines: list[str] = []
    parser = DebootstrapProgress(lines.append)

    feed(parser, "P: x y\nsomething else\nP: 3 7 NEWPHASE\nIF: %s")

    assert lines == ["[image] debootstrap: newphase 3/7"]
