"""Log setup for the apps: our own loggers at INFO, everything else left as it is.

A root ``basicConfig(INFO)`` would also switch on every HTTP request Flower's runtime
makes; the apps attach one handler to the project's loggers instead.
"""

from __future__ import annotations

import logging

PROJECT_LOGGERS = ("flower_llm", "strategies", "server_apps", "client_apps")


def setup_logging(level: int = logging.INFO) -> None:
    """Send the project's log records to stderr once, with a short prefix."""
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_flower_llm", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[flower-llm] %(message)s"))
            handler._flower_llm = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
