"""The watched files: inotify tells when one changed, and the engine reloads.

inotify_simple (a small, maintained ctypes wrapper of inotify_init1 and
friends, no compiled part) rather than polling stat() every 0.25 s: a change
is noticed in microseconds, and nothing runs while nothing changes. The
folders are watched, not the files: an editor or `kubectl`-style tool that
writes a new file and renames it over the old one (a new inode) is seen as
well as a write in place. A file being written is read once it is closed
(IN_CLOSE_WRITE) or moved into place (IN_MOVED_TO), never half-way.
"""
from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger("engine.watch")

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class FileWatcher:
    """Calls on_change(noticed, paths) (noticed: time.monotonic() of the
    first event; paths: the files that changed) when a file of the
    configuration changes, from a thread of its own. paths() gives what to watch now: (files, manifest folders); it is
    asked again after every change (a reload may name other files)."""

    def __init__(self, paths, on_change, settle=0):
        from inotify_simple import INotify, flags
        self._flags = flags
        self.mask = flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.CREATE
        self.inotify = INotify()
        self.paths = paths
        self.on_change = on_change
        self.settle = settle            # seconds to wait for more events of one save (queued ones are taken anyway)
        self._wd = {}                   # folder -> watch descriptor
        self._dirs = {}                 # watch descriptor -> folder
        self._files = set()
        self._folders = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="file-watch", daemon=True)
        self.rewatch()

    def rewatch(self):
        files, folders = self.paths()
        self._files = {os.path.abspath(f) for f in files}
        self._folders = {os.path.abspath(d) for d in folders}
        want = {os.path.dirname(f) for f in self._files} | self._folders
        for d in set(self._wd) - want:
            try:
                self.inotify.rm_watch(self._wd[d])
            except OSError:
                pass
            self._dirs.pop(self._wd.pop(d), None)
        for d in want - set(self._wd):
            try:
                wd = self.inotify.add_watch(d, self.mask)
            except OSError as e:
                log.warning("cannot watch %s: %s", d, e)
                continue
            self._wd[d], self._dirs[wd] = d, d

    def relevant(self, ev):
        """The path ev changed, or None when it is none of ours."""
        d = self._dirs.get(ev.wd)
        if d is None or not ev.name:
            return None
        if ev.mask & self._flags.CREATE and not ev.mask & self._flags.ISDIR:
            return None                 # still being written: its CLOSE_WRITE follows
        path = os.path.join(d, ev.name)
        if path in self._files:
            return path
        if d in self._folders and ev.name.endswith(MANIFEST_SUFFIXES) and not ev.name.startswith("."):
            return path
        return None

    def start(self):
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            try:
                events = self.inotify.read(timeout=500)
            except OSError:
                if self._stop.is_set():
                    return
                raise
            paths = {p for p in map(self.relevant, events) if p}
            if not paths:
                continue
            noticed = time.monotonic()
            if self.settle:
                time.sleep(self.settle)
            paths.update(p for p in map(self.relevant, self.inotify.read(timeout=0)) if p)     # queued meanwhile
            try:
                self.on_change(noticed, sorted(paths))
            except Exception:       # a refused reload is logged by on_change; the watcher goes on
                log.exception("reload after a file change failed")
            self.rewatch()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self.inotify.close()
