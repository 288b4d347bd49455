"""SendTargets lists only the targets the discovery session's initiator may
log in to (issue 10 item 14)."""
from __future__ import annotations

import pytest

from target.iscsi import IscsiTargetConfig

from .fake_scsi import FakeScsiTarget, MemLun
from .initiator import Initiator, LoginError
from .test_live import IQN, IQN2, addr, run, serving

ME = "iqn.2025-01.org.test:me"
OTHER = "iqn.2025-01.org.test:someone-else"


def two_targets():
    fake = FakeScsiTarget({0: MemLun(1 << 20)})
    return serving([IscsiTargetConfig(IQN, fake), IscsiTargetConfig(IQN2, fake, acl={OTHER})],
                   fake=fake)


async def names(srv, who: str, **login) -> list[str]:
    i = Initiator(*addr(srv), name=who)
    try:
        await i.login(discovery=True, **login)
        return [v for k, v in await i.send_targets("All") if k == "TargetName"]
    finally:
        await i.close()


def test_sendtargets_follows_the_acl():
    async def main():
        async with two_targets() as (srv, _):
            assert await names(srv, ME) == [IQN]
            assert await names(srv, OTHER) == [IQN, IQN2]
            srv.set_acl(IQN, {OTHER})                 # evaluated per request, not per login
            assert await names(srv, ME) == []
    run(main())


def test_initiator_name_cannot_change_after_the_first_login_request():
    """Declaring another InitiatorName in the operational stage used to make
    the discovery session list (and a Normal session act as) someone the
    ACL check never saw."""
    async def main():
        async with two_targets() as (srv, _):
            with pytest.raises(LoginError) as ei:
                await names(srv, ME, extra=[("InitiatorName", OTHER)])
            assert ei.value.status == (2, 0)
            i = Initiator(*addr(srv), name=OTHER)
            with pytest.raises(LoginError) as ei:
                await i.login(IQN2, extra=[("InitiatorName", ME)])
            assert ei.value.status == (2, 0)
            await i.close()
            # repeating the same name is allowed
            assert await names(srv, ME, extra=[("InitiatorName", ME)]) == [IQN]
            assert not srv.sessions or all(s.initiator_name == ME for s in srv.sessions.values())
    run(main())
