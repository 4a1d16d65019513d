"""The project's two test guests, how to build and find them, and pure checkers for
what they leave behind.

- memory guest (``memguest.S``): a multiboot kernel that dirties one byte per page of
  a range at a set rate and keeps a header at 0x5000 (``check.HEADER_ADDR``).
- disk guest (Debian's cloud kernel + ``diskguest-init.sh`` in a busybox initramfs):
  stamps, reads back and checks blocks of its virtio disk, round after round.

``paths.locate(kind)`` says how to boot a built guest; ``build.build_guests`` (or
``python -m shoal.vm.guests build``) builds them; ``check`` holds the checkers.
See docs/GUESTS.md.
"""

from shoal.vm.guests.paths import GuestImage, guests_dir, locate

__all__ = ["GuestImage", "guests_dir", "locate"]
