"""Files on disk, written safely: the cache keys, durable atomic writes (a file is whole or absent,
flushed to disk before its rename, the folder after), locks (concurrent runs share one cache
folder) and cache files read back are w2s_clip.py's own, named here for the package's modules.
"""
from w2s_clip import (atomic_save, cache_key, cached, file_lock, fsync_path,  # noqa: F401
                      load_cache, log_computed, refuse_link, remove_stale_temps, temp_path)
