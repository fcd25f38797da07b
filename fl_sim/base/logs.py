"""Console logging: quiet by default (warnings only); run.log always gets INFO."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGERS = ("fl_sim", "flwr")


def configure_console(verbosity: int = 0) -> None:
    """0: warnings, 1: info, 2+: debug — for fl-sim's and Flower's own console handler."""
    from flwr.supercore.logger import FLOWER_LOGGER, update_console_handler

    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(level)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(console)
    logging.getLogger("fl_sim").setLevel(min(level, logging.INFO))
    update_console_handler(level=level, timestamps=verbosity > 1, colored=True)
    FLOWER_LOGGER.propagate = False


@contextmanager
def run_log(root: Path) -> Iterator[None]:
    """Write fl-sim's and Flower's INFO logs to ``root/run.log`` while the block runs."""
    handler = logging.FileHandler(root / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        yield
    finally:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        handler.close()
