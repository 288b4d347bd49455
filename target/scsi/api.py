"""Transport-neutral contract between SCSI transports (embedded iSCSI, TCMU)
and the SCSI emulation.

A transport builds a ScsiCommand per received command (with all Data-Out
bytes already gathered), runs it with ``submit`` (or awaits
``ScsiTarget.execute``) and sends back the ScsiResponse. Status codes and
sense layout are the SCSI layer's business.
"""
from __future__ import annotations

from asyncio import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator, Protocol, Union

GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus: who sends the command, through which target port.

    ``initiator`` is the full initiator port name (iSCSI: "<iqn>,i,0x<isid>"),
    ``initiator_name`` the bare name (used by ACL-style checks and PR
    "all target ports"), ``target_port`` the target port name
    ("<target iqn>,t,0x<tpgt>"; TCMU has no nexus: use "tcmu").
    """

    initiator: str
    target_port: str
    initiator_name: str = ""
    transport_id: bytes = b""   # SPC TransportID of the initiator port, for PR
    # (initiator, target_port): what per-nexus state (unit attentions,
    # reservations) is keyed by; built once, read per command
    key: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.initiator, self.target_port))


@dataclass(slots=True)
class ScsiCommand:
    cdb: bytes
    lun: int
    nexus: Nexus
    data_out: memoryview | bytes | None = None   # every Data-Out byte of the command
    expected_in: int = 0                          # initiator's expected Data-In length
    task_tag: int = 0
    task_attr: int = 0                            # SAM task attribute (0 simple)
    # Data-In: the transport's own buffers; a read that completes at once
    # may fill them directly (ScsiResponse.data_in_placed) instead of
    # returning data_in
    into: list[memoryview] | None = None


@dataclass(slots=True)
class ScsiResponse:
    status: int = GOOD
    sense: bytes = b""
    data_in: bytes | bytearray | memoryview = b""
    # Data-Out commands: the CDB's Data-Out size, which only the CDB knows
    # (transports derive write residuals from it); None for the others
    transfer_length: int | None = None
    data_in_placed: bool = False      # the Data-In went into ScsiCommand.into


class Deferred:
    """An answer that comes when ``future`` (the store's own I/O) is done:
    ``finish(future)`` makes it then. A transport may take it from the
    future's done-callback (no coroutine, no Task: one loop step between
    the store's completion and the answer) and abort it by cancelling the
    future; awaited, it is the same."""

    __slots__ = ("future", "finish")

    def __init__(self, future: "Future[Any]", finish: Callable[["Future[Any]"], ScsiResponse]
                 ) -> None:
        self.future = future
        self.finish = finish

    def __await__(self) -> Generator[Any, None, ScsiResponse]:
        try:
            yield from self.future.__await__()
        except CancelledError:
            raise
        except Exception:       # noqa: BLE001 - finish() answers it
            pass
        return self.finish(self.future)


Submitted = Union[ScsiResponse, Deferred, Awaitable[ScsiResponse]]


class ScsiTarget(Protocol):
    """A set of LUNs behind one target port group, as a transport sees it.

    Optionally also ``submit(cmd) -> ScsiResponse | Awaitable[ScsiResponse]``:
    the same as execute, but a command that needs nothing waited for returns
    its response at once (no coroutine); see ``submitter``.
    """

    async def execute(self, cmd: ScsiCommand) -> ScsiResponse: ...

    def luns(self) -> list[int]: ...

    async def lun_reset(self, lun: int, nexus: Nexus) -> None: ...

    async def target_reset(self, nexus: Nexus) -> None: ...

    def nexus_lost(self, nexus: Nexus) -> None:
        """The I_T nexus went away (logout, connection loss): drop its state."""


def submitter(target: ScsiTarget) -> Callable[[ScsiCommand], Submitted]:
    """How a transport runs commands on ``target``: its ``submit`` if it
    has one, else ``execute`` (whose coroutine is the awaitable answer)."""
    return getattr(target, "submit", None) or target.execute
