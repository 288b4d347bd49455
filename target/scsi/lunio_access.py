"""The one place the LunIO access state and errors (restore_core.lunio)
become sense data; the handlers and the device call these."""
from __future__ import annotations

import logging

from restore_core.lunio import (Access, LunIO, MediumError, NotReadyError,
                                WriteProtectedError)

from . import constants as c
from .sense import CheckCondition

log = logging.getLogger(__name__)


def not_ready(reason: str = "") -> CheckCondition:
    return CheckCondition(c.NOT_READY, c.ASC_NOT_READY_MANUAL_INTERVENTION,
                          message=f"not ready: {reason}")


def write_protected(reason: str = "") -> CheckCondition:
    return CheckCondition(c.DATA_PROTECT, c.ASC_WRITE_PROTECTED,
                          message=f"write protected: {reason}")


def not_ready_sense(lunio: LunIO) -> CheckCondition | None:
    st = lunio.access_state()
    if st.access is Access.NOT_READY:
        return not_ready(st.reason)
    return None


def medium_error(e: MediumError, block_size: int, default_lba: int | None) -> CheckCondition:
    """MEDIUM ERROR with the failing LBA in INFORMATION (SBC-3 4.18)."""
    lba = e.offset // block_size if e.offset is not None else default_lba
    asc = c.ASC_WRITE_ERROR if e.write else c.ASC_UNRECOVERED_READ_ERROR
    return CheckCondition(c.MEDIUM_ERROR, asc, information=lba, message=str(e))


def map_lunio_error(e: Exception, block_size: int) -> CheckCondition | None:
    if isinstance(e, MediumError):
        return medium_error(e, block_size, None)
    if isinstance(e, NotReadyError):
        return not_ready(str(e))
    if isinstance(e, WriteProtectedError):
        return write_protected(str(e))
    return None
