"""Login state machine: stages, status classes, CHAP enforcement."""
import hashlib

import pytest

from target.iscsi import pdu as P
from target.iscsi.chap import ChallengeRegistry
from target.iscsi.login import LoginMachine
from target.iscsi.params import TargetPreferences, encode_text, parse_text
from target.iscsi.server import IscsiTargetConfig

IQN = "iqn.2025-01.org.test:t1"
INIT = "iqn.2025-01.org.test:host1"
ISID = bytes.fromhex("400001370001")


class Ctx:
    def __init__(self, targets):
        self.prefs = TargetPreferences()
        self.chap_registry = ChallengeRegistry()
        self.queue_depth = 32
        self.discovery_chap = None
        self.discovery_mutual_chap = None
        self.targets = {t.iqn: t for t in targets}

    def lookup_target(self, name):
        return self.targets.get(name)

    def initiator_allowed(self, t, name):
        return t.acl is None or name in t.acl

    def allocate_tsih(self):
        return 7

    def tsih_exists(self, tsih):
        return tsih == 7

    def session_capacity_left(self):
        return self.capacity

    def login_failed(self, initiator, source):
        return 0.0

    capacity = True


def req(csg, nsg, transit, pairs, *, itt=1, cmdsn=10, statsn=0, tsih=0, vmin=0, cont=False, raw=None):
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | nsg
    bhs = P.build_bhs(P.OP_LOGIN_REQ, flags, immediate=True, b3=vmin, itt=itt,
                      raw={8: ISID + tsih.to_bytes(2, "big")}, fields={24: cmdsn, 28: statsn})
    data = raw if raw is not None else encode_text(pairs)
    return P.Pdu(bytes(bhs), b"", data)


def machine(**tcfg):
    t = IscsiTargetConfig(IQN, object(), **tcfg)
    return LoginMachine(Ctx([t]))


LEAD = [("InitiatorName", INIT), ("SessionType", "Normal"), ("TargetName", IQN)]


def status(step):
    return (step.bhs[36], step.bhs[37])


def test_plain_login_two_stages():
    m = machine(alias="disk one")
    s = m.process(req(0, 1, True, LEAD + [("AuthMethod", "None")], statsn=55))
    assert s.outcome == "continue" and status(s) == (0, 0)
    assert s.bhs[1] == 0x81                       # T, CSG=0, NSG=1
    keys = dict(parse_text(s.data))
    assert keys == {"TargetPortalGroupTag": "1", "TargetAlias": "disk one", "AuthMethod": "None"}
    assert int.from_bytes(s.bhs[24:28], "big") == 55           # StatSN starts at ExpStatSN
    assert int.from_bytes(s.bhs[28:32], "big") == 10           # ExpCmdSN = login CmdSN
    assert int.from_bytes(s.bhs[32:36], "big") == 10 + 32 - 1
    assert s.bhs[14:16] == b"\0\0"
    s = m.process(req(1, 3, True, [("MaxRecvDataSegmentLength", "65536"), ("HeaderDigest", "CRC32C")],
                      statsn=56))
    assert s.outcome == "success" and s.bhs[1] == 0x87
    assert s.bhs[14:16] == (7).to_bytes(2, "big")               # TSIH in the final response
    assert int.from_bytes(s.bhs[24:28], "big") == 56
    r = m.result
    assert r.tsih == 7 and r.statsn == 57 and r.initial_cmdsn == 10 and not r.discovery
    assert r.params.header_digest and r.params.initiator_mrdsl == 65536


def test_skip_to_operational_when_no_auth_needed():
    m = machine()
    s = m.process(req(1, 3, True, LEAD))
    assert s.outcome == "success"
    assert dict(parse_text(s.data))["MaxRecvDataSegmentLength"] == "262144"


@pytest.mark.parametrize("pairs,st", [
    ([("SessionType", "Normal"), ("TargetName", IQN)], (2, 7)),           # no InitiatorName
    ([("InitiatorName", INIT)], (2, 7)),                                  # no TargetName
    ([("InitiatorName", INIT), ("TargetName", "iqn.2025-01.org.test:nope")], (2, 3)),
    ([("InitiatorName", INIT), ("SessionType", "Bogus")], (2, 9)),
])
def test_leading_login_errors(pairs, st):
    s = machine().process(req(0, 1, True, pairs + [("AuthMethod", "None")]))
    assert s.outcome == "fail" and status(s) == st


def test_acl():
    s = machine(acl={"iqn.2025-01.org.test:other"}).process(req(0, 1, True, LEAD + [("AuthMethod", "None")]))
    assert status(s) == (2, 2)
    s = machine(acl={INIT}).process(req(0, 1, True, LEAD + [("AuthMethod", "None")]))
    assert s.outcome == "continue"


def test_unsupported_version_and_bad_stage():
    assert status(machine().process(req(0, 1, True, LEAD, vmin=1))) == (2, 5)
    assert status(machine().process(req(3, 0, False, LEAD))) == (2, 0)
    assert status(machine().process(req(1, 0, True, LEAD))) == (2, 0)         # NSG < CSG


def test_new_connection_to_existing_session_refused():
    assert status(machine().process(req(1, 3, True, LEAD, tsih=7))) == (2, 6)
    assert status(machine().process(req(1, 3, True, LEAD, tsih=9))) == (2, 10)


def test_non_login_pdu_during_login():
    bhs = P.build_bhs(P.OP_NOP_OUT, 0x80, immediate=True, itt=3)
    assert status(machine().process(P.Pdu(bytes(bhs)))) == (2, 11)


def test_garbage_text_fails_login():
    s = machine().process(req(0, 1, True, [], raw=b"\xff\xfe=\x00garbage"))
    assert s.outcome == "fail" and status(s) == (2, 0)


def test_continued_text():
    m = machine()
    text = encode_text(LEAD + [("AuthMethod", "None")])
    s = m.process(req(0, 1, False, [], raw=text[:20], cont=True))
    assert s.outcome == "continue" and s.data == b""
    s = m.process(req(0, 1, True, [], raw=text[20:]))
    assert s.outcome == "continue" and dict(parse_text(s.data))["AuthMethod"] == "None"


def test_chap_required():
    m = machine(chap=("alice", "sekrit-sekrit"))
    s = m.process(req(1, 3, True, LEAD))                   # tries to skip security
    assert status(s) == (2, 1)
    m = machine(chap=("alice", "sekrit-sekrit"))
    s = m.process(req(0, 1, True, LEAD + [("AuthMethod", "None")]))
    assert status(s) == (2, 1)


def test_chap_login_and_mutual():
    m = machine(chap=("alice", "sekrit-sekrit"), mutual_chap=("tgt", "other-secret"))
    s = m.process(req(0, 1, True, LEAD + [("AuthMethod", "CHAP,None")]))
    assert dict(parse_text(s.data))["AuthMethod"] == "CHAP"
    assert not s.bhs[1] & 0x80                              # no transit before CHAP is done
    s = m.process(req(0, 1, False, [("CHAP_A", "5")]))
    k = dict(parse_text(s.data))
    ident, chal = int(k["CHAP_I"]), bytes.fromhex(k["CHAP_C"][2:])
    r = hashlib.md5(bytes([ident]) + b"sekrit-sekrit" + chal).hexdigest()
    ichal = bytes(range(16, 32))
    s = m.process(req(0, 1, True, [("CHAP_N", "alice"), ("CHAP_R", "0x" + r), ("CHAP_I", "9"),
                                   ("CHAP_C", "0x" + ichal.hex())]))
    k = dict(parse_text(s.data))
    assert s.bhs[1] == 0x81 and k["CHAP_N"] == "tgt"
    assert k["CHAP_R"] == "0x" + hashlib.md5(b"\x09other-secret" + ichal).hexdigest()
    s = m.process(req(1, 3, True, []))
    assert s.outcome == "success"


def test_chap_wrong_secret():
    m = machine(chap=("alice", "sekrit-sekrit"))
    m.process(req(0, 1, False, LEAD + [("AuthMethod", "CHAP")]))
    m.process(req(0, 1, False, [("CHAP_A", "5")]))
    s = m.process(req(0, 1, True, [("CHAP_N", "alice"), ("CHAP_R", "0x" + "11" * 16)]))
    assert s.outcome == "fail" and status(s) == (2, 1)


def test_target_config_validation():
    with pytest.raises(ValueError):
        IscsiTargetConfig("not-an-iqn", object())
    with pytest.raises(ValueError):
        IscsiTargetConfig(IQN, object(), chap=("a", "same-secret!"), mutual_chap=("b", "same-secret!"))
    with pytest.raises(ValueError):
        IscsiTargetConfig(IQN, object(), tpgt=0)


def test_security_straight_to_full_feature():
    m = machine()
    s = m.process(req(0, 3, True, LEAD + [("AuthMethod", "None"), ("MaxRecvDataSegmentLength", "4096")]))
    assert s.outcome == "success" and s.bhs[1] == 0x83
    k = dict(parse_text(s.data))
    assert k["AuthMethod"] == "None" and k["MaxRecvDataSegmentLength"] == "262144"
    assert m.result.params.initiator_mrdsl == 4096


def test_discovery_login_needs_no_target():
    m = machine()
    s = m.process(req(0, 1, True, [("InitiatorName", INIT), ("SessionType", "Discovery"),
                                   ("AuthMethod", "None")]))
    assert s.outcome == "continue" and "TargetPortalGroupTag" not in dict(parse_text(s.data))
    s = m.process(req(1, 3, True, [("HeaderDigest", "None")]))
    assert s.outcome == "success" and m.result.discovery and m.result.target is None


def test_chap_keys_in_same_pdu_as_authmethod():
    m = machine(chap=("alice", "sekrit-sekrit"))
    s = m.process(req(0, 1, False, LEAD + [("AuthMethod", "CHAP"), ("CHAP_A", "5")]))
    k = dict(parse_text(s.data))
    assert k["AuthMethod"] == "CHAP" and k["CHAP_A"] == "5" and "CHAP_C" in k


def test_out_of_sessions():
    m = machine()
    m.ctx.capacity = False
    assert status(m.process(req(0, 1, True, LEAD + [("AuthMethod", "None")]))) == (3, 2)
