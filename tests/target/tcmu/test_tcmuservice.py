"""Our handler on D-Bus the way tcmu-runner's protocol has it
(target.tcmu.tcmuservice), against a private dbus-daemon: standalone (we own
org.kernel.TCMUService1 and answer targetcli's GetManagedObjects and
CheckConfig), and with a tcmu-runner stand-in that starts later, queues
for its name and gets our RegisterHandler after we hand the name over."""
from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from dbus_fast import Message, MessageType, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.service import ServiceInterface, method

from target.tcmu.tcmuservice import (BUS_NAME, IFACE, MANAGER_IFACE, MANAGER_PATH, ROOT_PATH,
                                     TcmuServiceRegistration, handler_bus_name, handler_path)

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")

POLICY = """<busconfig><type>system</type><listen>unix:path={path}</listen><auth>EXTERNAL</auth>
<policy context="default"><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>
</busconfig>"""


@pytest.fixture
def bus_address(tmp_path):
    conf = tmp_path / "bus.conf"
    conf.write_text(POLICY.format(path=tmp_path / "bus"))
    p = subprocess.Popen(["dbus-daemon", "--config-file", str(conf), "--nofork", "--print-address"],
                         stdout=subprocess.PIPE, text=True)
    addr = p.stdout.readline().strip()
    yield addr
    p.terminate()
    p.wait(timeout=10)


def check(config: str) -> tuple[bool, str]:
    return (config == "liverestore/vol1", "no liverestore volume named that")


async def _call(bus, dest, path, iface, member, sig="", body=()):
    r = await bus.call(Message(destination=dest, path=path, interface=iface, member=member,
                               signature=sig, body=list(body)))
    assert r.message_type == MessageType.METHOD_RETURN, r.body
    return r.body


class FakeRunner(ServiceInterface):
    """tcmu-runner's HandlerManager1: RegisterHandler, then CheckConfig forwarded."""

    def __init__(self):
        super().__init__(MANAGER_IFACE)
        self.registered: list[tuple[str, str]] = []

    @method()
    def RegisterHandler(self, subtype: "s", cfgstr_desc: "s") -> "bs":  # noqa: N802,F821
        self.registered.append((subtype, cfgstr_desc))
        return [True, "succeeded"]


def test_standalone_then_handed_to_a_tcmu_runner_started_later(bus_address):
    async def run():
        reg = TcmuServiceRegistration("liverestore", "liverestore/VOLUME", check, bus_address=bus_address,
                                      interval=0.1)
        await reg.start()
        assert reg.mode == "owner"
        cli = await MessageBus(bus_address=bus_address).connect()
        # targetcli: GetManagedObjects on the root, then CheckConfig on each handler object
        objs = (await _call(cli, BUS_NAME, ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                            "GetManagedObjects"))[0]
        assert list(objs) == [f"{ROOT_PATH}/liverestore"]
        assert objs[f"{ROOT_PATH}/liverestore"][IFACE]["ConfigDesc"].value == "liverestore/VOLUME"
        assert await _call(cli, BUS_NAME, f"{ROOT_PATH}/liverestore", IFACE, "CheckConfig", "s",
                           ["liverestore/vol1"]) == [True, "success"]
        assert await _call(cli, BUS_NAME, f"{ROOT_PATH}/liverestore", IFACE, "CheckConfig", "s",
                           ["liverestore/nope"]) == [False, "no liverestore volume named that"]
        # tcmu-runner starts: it queues for its name (flags NONE, as g_bus_own_name does)
        runner_bus = await MessageBus(bus_address=bus_address).connect()
        runner = FakeRunner()
        runner_bus.export(MANAGER_PATH, runner)
        assert await runner_bus.request_name(BUS_NAME, NameFlag.NONE) == RequestNameReply.IN_QUEUE
        for _ in range(100):
            await asyncio.sleep(0.05)
            if runner.registered:
                break
        assert runner.registered == [("liverestore", "liverestore/VOLUME")]
        assert reg.mode == "registered"
        owner = (await _call(cli, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "GetNameOwner", "s", [BUS_NAME]))[0]
        assert owner == runner_bus.unique_name
        # what tcmu-runner's on_dbus_check_config forwards to
        assert await _call(cli, handler_bus_name("liverestore"), handler_path("liverestore"), IFACE,
                           "CheckConfig", "s", ["liverestore/vol1"]) == [True, "success"]
        # tcmu-runner restarts (a new unique name): we register again
        runner_bus.disconnect()
        runner_bus2 = await MessageBus(bus_address=bus_address).connect()
        runner2 = FakeRunner()
        runner_bus2.export(MANAGER_PATH, runner2)
        await asyncio.sleep(0.3)
        await runner_bus2.request_name(BUS_NAME, NameFlag.NONE)
        for _ in range(100):
            await asyncio.sleep(0.05)
            if runner2.registered:
                break
        assert runner2.registered == [("liverestore", "liverestore/VOLUME")]
        await reg.stop()
        cli.disconnect()
        runner_bus2.disconnect()
    asyncio.run(asyncio.wait_for(run(), 30))


def test_no_bus_is_a_warning_not_a_failure(tmp_path, caplog):
    async def run():
        reg = TcmuServiceRegistration("liverestore", "d", check, bus_address=f"unix:path={tmp_path}/none")
        await reg.start()
        assert reg.mode is None
        await reg.stop()
    asyncio.run(run())
    assert "targetcli will not list user:liverestore backstores" in caplog.text
