"""The LIO front end's description of what to export (pure; the real kernel
run is in tests/vm)."""
from types import SimpleNamespace

import pytest

from persistence.config import VolumeRecord
from target.frontends import LIO_CMD_TIME_OUT, LioFrontend, choose_backend


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
