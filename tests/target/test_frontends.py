"""The LIO front end's description of what to export (pure; the real kernel
run is in tests/vm)."""
import asyncio
from types import SimpleNamespace

import pytest

from persistence.config import VolumeRecord
from target.frontends import LIO_CMD_TIME_OUT, LioFrontend, choose_backend
from target.lio.plan import AclState, LioState, converge
from target.lio.rts import Report
from tests.target.lio.test_plan import simulate


class FakeConfig:
    def volume(self, name):
        return VolumeRecord(name, f"/x/{name}.img", 64 << 20, 65536)


def frontend():
    return LioFrontend(SimpleNamespace(cfg=FakeConfig(), devices={}), [("127.0.0.1", 3260)])


def test_description_maps_targets_luns_acls_and_chap():
    targets = {
        "iqn.2026-11.io.liverestore:a": {"luns": {"1": "db1-clone", "0": "db1"}, "tpgt": 1,
                                         "acl": ["iqn.1993-08.org.debian:01:h1"],
                                         "chap": ["u", "secret-123456"], "mutual_chap": None},
        "iqn.2026-11.io.liverestore:b": {"luns": {"0": "web"}, "tpgt": 2, "acl": None,
                                         "chap": None, "mutual_chap": None},
    }
    d = frontend()._description(targets)
    assert sorted(v.name for v in d.volumes) == ["db1", "db1-clone", "web"]
    assert all(v.config == f"liverestore/{v.name}" for v in d.volumes)
    assert all(v.control == "nl_reply_supported=-1" for v in d.volumes)
    assert all(dict(v.attributes)["cmd_time_out"] == LIO_CMD_TIME_OUT for v in d.volumes)
    a = {t.iqn: t for t in d.targets}
    tpg_a = a["iqn.2026-11.io.liverestore:a"].tpgs[0]
    assert [(l.lun, l.volume) for l in tpg_a.luns] == [(0, "db1"), (1, "db1-clone")]
    assert [x.initiator for x in tpg_a.acls] == ["iqn.1993-08.org.debian:01:h1"]
    assert tpg_a.acls[0].chap.userid == "u"
    tpg_b = a["iqn.2026-11.io.liverestore:b"].tpgs[0]
    assert tpg_b.tag == 2 and not tpg_b.acls          # demo mode: any initiator


def test_open_refuses_unknown_or_resized_volume():
    f = frontend()
    with pytest.raises(LookupError):
        f._open("nope", 1 << 20, 512)
    f.service.devices["v"] = SimpleNamespace(lunio=SimpleNamespace(size=2 << 20))
    with pytest.raises(ValueError, match="bytes"):
        f._open("v", 1 << 20, 512)
    assert f._open("v", 2 << 20, 512) is f.service.devices["v"]


def test_backend_choice():
    assert choose_backend("embedded") == "embedded"
    assert choose_backend("lio") == "lio"
    with pytest.raises(ValueError):
        choose_backend("nbd")


# -- issue 15: an admin's change inside our target survives an unrelated export create ---------
class FakeLio:
    """LioConfigurator over an in-memory LioState, changed the way LIO would."""

    def __init__(self) -> None:
        self.state = LioState()
        self.dbroot = None

    def apply(self, desc, *, prune=False, previous=None):
        p = converge(desc, self.state, prune=prune, previous=previous)
        self.state = simulate(self.state, p.changes)
        return Report(p.changes, p.drift)

    def plan_against(self, desc):
        return converge(desc, self.state, prune=True, previous=desc)


class FakeHandler:
    """Serves every user backstore of the fake LIO (as the TCMU handler would)."""

    def __init__(self, lio: FakeLio) -> None:
        self.lio = lio

    @property
    def devices(self):
        return {f"tcm-user/0/{b.name}/{b.config}": object() for b in self.lio.state.backstores.values()}

    async def rescan(self):
        return {}


ADMIN = "iqn.1994-05.com.example:admin"
T1, T2 = "iqn.2026-11.io.liverestore:t1", "iqn.2026-11.io.liverestore:t2"


def _target(vol):
    return {"luns": {"0": vol}, "tpgt": 1, "acl": None, "chap": None, "mutual_chap": None}


def test_admin_acl_survives_an_unrelated_export_create_and_shows_as_drift():
    f = frontend()
    f.lio = FakeLio()
    f.handler = FakeHandler(f.lio)
    f._targets = {T1: _target("a")}
    asyncio.run(f._apply())
    assert f.stats()["drift"] == []
    f.lio.state.targets[T1][1].acls[ADMIN] = AclState(ADMIN, None, {0: 0})      # targetcli
    asyncio.run(f.set_target(T2, _target("b")))                               # export create
    assert f.lio.state.targets[T1][1].acls[ADMIN].mapped == {0: 0}
    assert T2 in f.lio.state.targets
    assert f.stats()["drift"] == [f"{T1}/tpg1/acls/{ADMIN}: an ACL not in liverestore's configuration: "
                                  "left as is"]
    del f.lio.state.targets[T1][1].luns[0]                                    # targetcli deletes our LUN
    assert any(d.startswith(f"{T1}/tpg1/lun0: liverestore will create lun") for d in f.stats()["drift"])
