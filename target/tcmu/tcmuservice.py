"""Our TCMU handler on the system bus, the way tcmu-runner's handlers are.

targetcli lists ``user:<subtype>`` backstores only for the handlers it
finds under the bus name ``org.kernel.TCMUService1``: it asks that name's
ObjectManager at ``/org/kernel/TCMUService1`` for its objects, takes each
object's last path element as the subtype, shows its ``ConfigDesc``
property as help and calls its ``CheckConfig(s) -> (b, s)`` before it
creates a backstore (tcmu-runner's main.c and tcmu-handler.xml,
targetcli-fb's ui_backstore.py).

Two ways to be there, as tcmu-runner's protocol has them:

* tcmu-runner owns the name: we own
  ``org.kernel.TCMUService1.HandlerManager1.<subtype>``, export our handler
  object at ``/org/kernel/TCMUService1/HandlerManager1/<subtype>`` and call
  ``RegisterHandler(subtype, ConfigDesc)`` on its HandlerManager1; it then
  exports ``/org/kernel/TCMUService1/<subtype>`` and forwards CheckConfig
  to us. (It also adds a handler of that subtype to its own table, whose
  open always fails: tcmu-runner never serves our devices.)
* nobody owns it: we own it ourselves and export the handler object at
  ``/org/kernel/TCMUService1/<subtype>`` (dbus-fast answers
  GetManagedObjects on any exported path). A tcmu-runner started later
  queues for the name; we hand it over and register with it.

The bus is re-checked every ``interval`` seconds (a restarted tcmu-runner
has a new unique name: we register again). Without a system bus, or when
its policy refuses us, the daemon serves as before and only targetcli's
view is missing: one warning says so. Calls go to tcmu-runner's unique
name, never to the well-known one, so nothing here starts a D-Bus
activatable tcmu-runner.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from dbus_fast import BusType, Message, MessageFlag, MessageType, NameFlag, ReleaseNameReply, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_property, method

log = logging.getLogger(__name__)

BUS_NAME = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"
IFACE = "org.kernel.TCMUService1"
MANAGER_PATH = f"{ROOT_PATH}/HandlerManager1"
MANAGER_IFACE = f"{IFACE}.HandlerManager1"
_DBUS = dict(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus", interface="org.freedesktop.DBus")

CheckConfig = Callable[[str], "tuple[bool, str]"]


def handler_bus_name(subtype: str) -> str:
    return f"{MANAGER_IFACE}.{subtype}"


def handler_path(subtype: str) -> str:
    return f"{MANAGER_PATH}/{subtype}"


class HandlerObject(ServiceInterface):
    """``org.kernel.TCMUService1`` of one handler: ConfigDesc, CheckConfig."""

    def __init__(self, config_desc: str, check: CheckConfig) -> None:
        super().__init__(IFACE)
        self._desc = config_desc
        self._check = check

    @method()
    def CheckConfig(self, configstr: "s") -> "bs":  # noqa: N802,F821 - D-Bus names and signatures
        try:
            ok, why = self._check(configstr)
        except Exception as e:  # noqa: BLE001 - a bus caller gets a refusal, never our traceback
            log.exception("CheckConfig(%r) failed", configstr[:200])
            ok, why = False, f"internal error: {type(e).__name__}"
        return [bool(ok), "success" if ok else why]

    @dbus_property(access=PropertyAccess.READ)
    def ConfigDesc(self) -> "s":  # noqa: N802,F821
        return self._desc


class TcmuServiceRegistration:
    """Keeps our handler visible to targetcli on the system bus (see above)."""

    def __init__(self, subtype: str, config_desc: str, check: CheckConfig, *,
                 bus_address: str | None = None, interval: float = 5.0) -> None:
        self.subtype = subtype
        self.obj = HandlerObject(config_desc, check)
        self.bus_address = bus_address
        self.interval = interval
        self.bus: MessageBus | None = None
        self.mode: str | None = None          # "owner" (we own BUS_NAME) or "registered" (with tcmu-runner)
        self._runner: str | None = None       # tcmu-runner's unique name we registered with
        self._task: asyncio.Task | None = None
        self._warned = False
        self._path: str | None = None         # where our handler object is exported

    def _export_at(self, path: str | None) -> None:
        """Export the handler object at ``path`` only (one place at a time:
        GetManagedObjects on the root would list it twice otherwise)."""
        if self._path == path:
            return
        if self._path is not None:
            self.bus.unexport(self._path, self.obj)
        if path is not None:
            self.bus.export(path, self.obj)
        self._path = path

    async def start(self) -> None:
        try:
            bus = MessageBus(bus_address=self.bus_address) if self.bus_address \
                else MessageBus(bus_type=BusType.SYSTEM)
            self.bus = await bus.connect()
        except Exception as e:  # noqa: BLE001 - no bus: serve anyway, targetcli just cannot list us
            self._warn(f"no system D-Bus ({e})")
            return
        await self.settle()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.bus is not None:
            self.bus.disconnect()
            self.bus = None
        self.mode, self._path, self._runner = None, None, None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.settle()

    def _warn(self, why: str) -> None:
        if not self._warned:
            log.warning("targetcli will not list user:%s backstores: %s", self.subtype, why)
            self._warned = True

    async def _bus_call(self, member: str, signature: str = "", body: list | None = None, **kw) -> Message:
        args = {**_DBUS, **kw}
        reply = await self.bus.call(Message(member=member, signature=signature, body=body or [],
                                            flags=MessageFlag.NO_AUTOSTART, **args))
        return reply

    async def _owner(self) -> str | None:
        r = await self._bus_call("GetNameOwner", "s", [BUS_NAME])
        return r.body[0] if r.message_type == MessageType.METHOD_RETURN else None

    async def settle(self) -> None:
        """One look at the bus: own the name, hand it over, or register."""
        try:
            await self._settle()
        except Exception as e:  # noqa: BLE001 - the bus went away or refused: try again next time
            self._warn(f"D-Bus: {e}")
            log.debug("D-Bus settle failed", exc_info=True)

    async def _settle(self) -> None:
        if self.bus is None:
            return
        owner = await self._owner()
        me = self.bus.unique_name
        if owner == me:
            queued = await self._bus_call("ListQueuedOwners", "s", [BUS_NAME])
            if any(n != me for n in queued.body[0]):
                # tcmu-runner started after us and waits for its name: give it back
                r = await self.bus.release_name(BUS_NAME)
                self._export_at(None)
                self.mode = None
                log.info("D-Bus: handed %s to the handler service queued for it (%s)", BUS_NAME,
                         ReleaseNameReply(r).name)
                owner = await self._owner()
        if owner is None:
            r = await self.bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
            if r != RequestNameReply.PRIMARY_OWNER:
                return                                  # someone got there first: next round
            self._export_at(f"{ROOT_PATH}/{self.subtype}")
            self.mode, self._runner = "owner", None
            log.info("D-Bus: %s owned; targetcli lists user:%s", BUS_NAME, self.subtype)
            return
        if owner != me and owner != self._runner:
            await self._register(owner)

    async def _register(self, runner: str) -> None:
        name = handler_bus_name(self.subtype)
        if self.mode != "registered":
            r = await self.bus.request_name(name, NameFlag.DO_NOT_QUEUE)
            if r not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                self._warn(f"{name} is owned by another process")
                return
            self._export_at(handler_path(self.subtype))
            self.mode = "registered"
        reply = await self.bus.call(Message(
            destination=runner, path=MANAGER_PATH, interface=MANAGER_IFACE, member="RegisterHandler",
            signature="ss", body=[self.subtype, self.obj._desc], flags=MessageFlag.NO_AUTOSTART))
        if reply.message_type != MessageType.METHOD_RETURN or not reply.body[0]:
            self._warn(f"tcmu-runner refused RegisterHandler: {reply.body}")
            return
        self._runner = runner
        log.info("D-Bus: registered user:%s with the handler service %s (%s)", self.subtype, runner,
                 reply.body[1])
