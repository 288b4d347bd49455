"""What a host sees of a block store's failure: one rule for every LunIO."""
from __future__ import annotations

from .blockstore import BlockStoreError, StoreFencedError
from .lunio import LunIOError, MediumError, NotReadyError


def host_error(e: BlockStoreError, *, write: bool = False) -> LunIOError:
    """NOT READY with the reason when the store was fenced (the volume went
    offline: the medium is fine, another client owns the image now), else
    MEDIUM ERROR at the failing offset."""
    if isinstance(e, StoreFencedError):
        return NotReadyError(str(e))
    return MediumError(str(e), e.offset, write=write)
