"""Log a message once per process and key: where a fast path cannot run, the reason is said once, not per call."""
from __future__ import annotations

import logging
import threading

_LOGGED = set()
_LOCK = threading.Lock()


def log_once(key: str, level: int, msg: str, *args, logger: str = "wan_int8") -> None:
    """`logging.getLogger(logger).log(level, msg, *args)` the first time `key` is seen; later calls do nothing."""
    with _LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logging.getLogger(logger).log(level, msg, *args)
