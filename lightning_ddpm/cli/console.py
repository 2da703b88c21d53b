"""A quiet console: Lightning's advertisements dropped, and the version line."""

from __future__ import annotations

import logging

from .errors import PROG


class _DropTips(logging.Filter):
    """Lightning's console advertisements ("💡 Tip: ... try installing ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡")


_DROP_TIPS = _DropTips()


def _quiet() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DROP_TIPS)  # once: addFilter skips a filter it already has


def version_line() -> str:
    """``lightning-ddpm 0.1.0 (torch ..., lightning ...)``: what ``--version`` prints."""
    import lightning
    import torch

    from .. import __version__

    return f"{PROG} {__version__} (torch {torch.__version__}, lightning {lightning.__version__})"
