"""A power cut for the durability tests: directory entries never flushed are lost.

:class:`PowerCut` watches ``os.fsync``: each flush of a directory records the entries it holds
then, which are the ones a power cut keeps. :meth:`PowerCut.cut` then does to a tree what a
power cut does to its directories: every entry created since its directory's last flush is
gone (a directory never flushed loses all of its entries), and so is what lies below it. The
contents of the files kept are left as they are: only lost directory entries are modelled.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest


class PowerCut:
    """Entries flushed (by ``os.fsync`` of their directory) under ``root`` since it was made;
    what was already there counts as flushed."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root.resolve()  # as /proc names a directory
        self.flushed: dict[str, set[str]] = {}
        for directory, _, _ in os.walk(self.root):
            self.flushed[directory] = set(os.listdir(directory))
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                directory = os.readlink(f"/proc/self/fd/{fd}")
                self.flushed[directory] = set(os.listdir(directory))

        monkeypatch.setattr(os, "fsync", fsync)

    def cut(self) -> None:
        """Drop every entry under ``root`` whose directory was not flushed since it was made."""
        def drop(directory: str) -> None:
            kept = self.flushed.get(directory, set())
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if name not in kept:
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    else:
                        os.unlink(path)
                elif os.path.isdir(path):
                    drop(path)

        drop(str(self.root))
