"""``python -m shoal.vm.guests build [--dir D] [--force]``: build the test guests
(a quick no-op when they are up to date); ``... where``: say where they are."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal.vm.errors import GuestError
from shoal.vm.guests.build import build_guests
from shoal.vm.guests.paths import GUESTS_DIR_ENV, KINDS, guests_dir, locate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.vm.guests", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the memory and disk test guests")
    build.add_argument(
        "--dir", type=Path, help=f"guests directory (default: ${GUESTS_DIR_ENV} or {guests_dir()})"
    )
    build.add_argument(
        "--force", action="store_true", help="rebuild even if up to date, with the newest kernel"
    )
    where = sub.add_parser("where", help="print how to boot each built guest")
    where.add_argument("--dir", type=Path, help="guests directory")
    args = parser.parse_args(argv)
    directory = args.dir if args.dir is not None else guests_dir()
    try:
        if args.command == "build":
            built = build_guests(directory, force=args.force, progress=_say)
            for sentence in built:
                _say(sentence)
            if not built:
                _say(f"the test guests in {directory} are up to date")
        else:
            for kind in KINDS:
                image = locate(kind, directory)
                initrd = f" -initrd {image.initrd}" if image.initrd else ""
                print(
                    f"{kind}: -m {image.memory_mib} -kernel {image.kernel}{initrd} -append '{image.append}'"
                )
    except GuestError as err:
        print(f"shoal.vm.guests: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _say(sentence: str) -> None:
    print(f"shoal.vm.guests: {sentence}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
