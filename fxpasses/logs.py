"""fxpasses' log records in vLLM's log: the one logging concern shared by the plugin and the pass."""
from __future__ import annotations

import logging


def bridge_logging() -> None:
    """Route the `fxpasses` logger's records through vLLM's logger (same handlers, format and level),
    so the mapping / registration / site lines appear in vLLM's log. vLLM configures its handlers
    lazily, so the records are forwarded by parentage rather than by copying handlers. No-op when
    the user configured the `fxpasses` logger."""
    fx = logging.getLogger("fxpasses")
    if fx.handlers or fx.parent is not logging.getLogger():
        return
    fx.parent = logging.getLogger("vllm")
