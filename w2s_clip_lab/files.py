"""Files on disk, written safely: cache keys, atomic writes (a file is whole or absent), locks
(concurrent runs share one cache folder, also over NFS) and cache files read back, a damaged one
recomputed. The bottom of w2s_clip_lab: it imports nothing of the package but the checks' one-line
message.
"""
import contextlib
import errno
import hashlib
import io
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch

from w2s_clip import UserError
from w2s_clip_lab.checks import one_line


# ------------------------------------------------------------------------------------------------
# Caches: keyed by everything that made them, written whole, one writer at a time
# ------------------------------------------------------------------------------------------------
def cache_key(**parts):
    """A short stable hash of keyword arguments (anything json can print with str as fallback)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def temp_path(path):
    """Where a write of `path` goes first: `.<name>.<pid>@<host>.tmp` beside it, renamed into
    place when whole. The host tells a process of this machine from one of another machine
    writing the same shared folder (NFS), whose process ids mean nothing here."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}@{socket.gethostname()}.tmp")


def remove_stale_temps(folder, name="*", other_host_age=86400.0):
    """Delete the temporary files (`temp_path`) that a write left in `folder` (not recursive) when
    it failed or its process was killed: this machine's of a process that is gone (and older
    `.<name>.<pid>.tmp` files without a host); another machine's only once untouched for
    `other_host_age` seconds, as a job there may be writing it now. A file of a process still
    running is kept."""
    for tmp in Path(folder).glob(f".{name}.*.tmp"):
        match = re.fullmatch(r"\.(.+?)\.(\d+)(?:@(.+))?\.tmp", tmp.name)
        if not match or (int(match[2]) == os.getpid() and match[3] in (None, socket.gethostname())):
            continue
        if match[3] is not None and match[3] != socket.gethostname():
            try:
                if time.time() - tmp.stat().st_mtime > other_host_age:
                    tmp.unlink(missing_ok=True)
            except OSError:
                pass
            continue
        try:
            os.kill(int(match[2]), 0)  # raises if no such process
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (OSError, OverflowError):
            pass  # another user's process, or not a pid: leave it


def refuse_link(path):
    """A UserError when `path` is a symbolic link: a write renames a new file into place, which
    would replace the link the user made (its target is never written through either)."""
    if os.path.islink(path):
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}), which is never "
                        f"replaced or written through; remove the link or write elsewhere")


def atomic_save(obj, path):
    """torch.save (JSON for a .json path; the bytes themselves for str or bytes) to a temporary
    file, then rename it into place.

    On a failed write the temporary file is removed; a full disk becomes a UserError naming the
    folder; a `path` that is a symbolic link is a UserError (`refuse_link`), before anything is
    written. Stale temporary files of `path` from dead processes are removed first.
    """
    path = Path(path)
    refuse_link(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = temp_path(path)
    try:
        if path.suffix == ".json":
            data = json.dumps(obj, indent=1, default=str).encode()
        elif isinstance(obj, (str, bytes)):  # a table, a figure
            data = obj.encode() if isinstance(obj, str) else obj
        else:
            buffer = io.BytesIO()  # torch's own writer hides the errno of a failed write
            torch.save(obj, buffer)
            data = buffer.getbuffer()
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on {path.parent} (writing {path.name}); free some "
                            f"space or point --cache-dir / --out-dir elsewhere") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path} ({e.strerror or e}); check the folder") from None
        raise


@contextlib.contextmanager
def file_lock(path):
    """An exclusive advisory lock (fcntl.flock) on the hidden file `.<name>.lock` beside `path`,
    held for the block: processes writing the same file take turns."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some NFS, Lustre mounts)
            print(f"warning: cannot lock {path} ({e.strerror}); writing it without a lock",
                  file=sys.stderr, flush=True)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_cache(path):
    """The object in cache file `path` (torch or .json), or None, with a one-line warning on
    stderr, if it cannot be loaded (truncated, damaged): caches are derived data."""
    try:
        if str(path).endswith(".json"):
            return json.loads(Path(path).read_text())
        return torch.load(path, weights_only=True)
    except Exception as e:  # any failure to read derived data means: compute it again
        print(f"warning: cache file {path} cannot be loaded ({one_line(e)}); recomputing it",
              file=sys.stderr, flush=True)
        return None


def cached(path, compute, force=False):
    """Load `path` if it exists (and not `force`) and loads, else compute, save atomically and
    return. Computing holds a lock on `path` (`file_lock`): a second process asking for the same
    entry waits, then loads what the first one wrote (`make jobs` runs share one cache)."""
    if os.path.exists(path) and not force:
        obj = load_cache(path)
        if obj is not None:
            return obj
    with file_lock(path):
        if os.path.exists(path) and not force:  # written while this process waited
            obj = load_cache(path)
            if obj is not None:
                return obj
        obj = compute()
        atomic_save(obj, path)
        log_computed(path)
    return obj


def log_computed(path):
    """Append `path` to the file named by $W2S_CLIP_CACHE_LOG, if set: which process computed
    which cache entry (O_APPEND: whole lines from concurrent processes)."""
    log = os.environ.get("W2S_CLIP_CACHE_LOG")
    if log:
        try:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
        except OSError as e:  # a log that cannot be written must not stop the run
            print(f"warning: W2S_CLIP_CACHE_LOG {log} cannot be written ({e.strerror})",
                  file=sys.stderr, flush=True)
