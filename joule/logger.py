"""The `joule` logger: INFO to stderr by default, as vLLM does, unless the application configured it."""

from __future__ import annotations

import logging
import os


def get_logger() -> logging.Logger:
    logger = logging.getLogger("joule")
    if not logger.handlers and os.environ.get("JOULE_CONFIGURE_LOGGING", "1") != "0":
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s joule: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("JOULE_LOGGING_LEVEL", "INFO"))
        logger.propagate = False
    return logger
