"""CHAP-MD5 known answers and the target-side exchange, incl. mutual CHAP."""
import hashlib

import pytest

from target.iscsi.chap import (ChallengeRegistry, ChapAuthenticator, ChapError, chap_md5,
                               decode_binary, encode_binary)

SECRET = "liverest-secret"
CHALLENGE = bytes(range(16))


def test_chap_md5_known_answer():
    # MD5(0x2a || "liverest-secret" || 00 01 .. 0f)
    assert chap_md5(0x2A, SECRET.encode(), CHALLENGE).hex() == "b69849df9fcc42234761bf035c3d4662"
    # RFC 1321 test suite value, to pin the hash itself: MD5("abc")
    assert chap_md5(ord("a"), b"b", b"c").hex() == "900150983cd24fb0d6963f7d28e17f72"


def test_binary_encodings():
    assert encode_binary(b"\x01\xab") == "0x01ab"
    assert decode_binary("0x01AB") == b"\x01\xab"
    assert decode_binary("0X1ab") == b"\x01\xab"          # odd digit count
    assert decode_binary("0bAas=") == b"\x01\xab"         # base64
    for bad in ("01ab", "0xzz", "0b!!", ""):
        with pytest.raises(ChapError):
            decode_binary(bad)


def fixed_rng(seq):
    it = iter(seq)
    return lambda n: next(it)[:n]


def make_auth(mutual=None, registry=None):
    rng = fixed_rng([b"\x2a", CHALLENGE])
    return ChapAuthenticator(("alice", SECRET), mutual, registry, rng=rng)


def test_exchange_success():
    a = make_auth()
    out = dict(a.step({"CHAP_A": "7,6,5"}))
    assert out == {"CHAP_A": "5", "CHAP_I": "42", "CHAP_C": "0x" + CHALLENGE.hex()}
    resp = hashlib.md5(b"\x2a" + SECRET.encode() + CHALLENGE).hexdigest()
    assert a.step({"CHAP_N": "alice", "CHAP_R": "0x" + resp}) == []
    assert a.done


@pytest.mark.parametrize("keys", [
    {"CHAP_N": "alice", "CHAP_R": "0x" + "00" * 16},                    # wrong response
    {"CHAP_N": "mallory", "CHAP_R": "0xb69849df9fcc42234761bf035c3d4662"},   # wrong user
    {"CHAP_N": "alice"},                                                   # missing response
])
def test_exchange_failures(keys):
    a = make_auth()
    a.step({"CHAP_A": "5"})
    with pytest.raises(ChapError):
        a.step(keys)


def test_unsupported_algorithm():
    with pytest.raises(ChapError):
        make_auth().step({"CHAP_A": "7,6"})


def good_response():
    return "0xb69849df9fcc42234761bf035c3d4662"


def test_mutual_chap_known_answer():
    a = make_auth(mutual=("target-user", "target-secret"))
    a.step({"CHAP_A": "5"})
    ichal = bytes(range(100, 116))
    out = dict(a.step({"CHAP_N": "alice", "CHAP_R": good_response(), "CHAP_I": "7",
                       "CHAP_C": "0x" + ichal.hex()}))
    assert out["CHAP_N"] == "target-user"
    assert out["CHAP_R"] == "0x" + hashlib.md5(b"\x07" + b"target-secret" + ichal).hexdigest()


def test_mutual_requested_but_not_configured():
    a = make_auth()
    a.step({"CHAP_A": "5"})
    with pytest.raises(ChapError):
        a.step({"CHAP_N": "alice", "CHAP_R": good_response(), "CHAP_I": "7", "CHAP_C": "0x0102"})


def test_reflected_challenge_rejected():
    a = make_auth(mutual=("t", "other-secret"))
    a.step({"CHAP_A": "5"})
    with pytest.raises(ChapError):
        a.step({"CHAP_N": "alice", "CHAP_R": good_response(), "CHAP_I": "42",
                "CHAP_C": "0x" + CHALLENGE.hex()})


def test_replayed_initiator_challenge_rejected():
    reg = ChallengeRegistry()
    ichal = "0x" + bytes(range(50, 66)).hex()
    a = ChapAuthenticator(("alice", SECRET), ("t", "other-secret"), reg,
                          rng=fixed_rng([b"\x2a", CHALLENGE]))
    a.step({"CHAP_A": "5"})
    a.step({"CHAP_N": "alice", "CHAP_R": good_response(), "CHAP_I": "1", "CHAP_C": ichal})
    other = bytes(range(200, 216))
    b = ChapAuthenticator(("alice", SECRET), ("t", "other-secret"), reg,
                          rng=fixed_rng([b"\x2a", other]))
    b.step({"CHAP_A": "5"})
    resp = "0x" + chap_md5(0x2A, SECRET.encode(), other).hex()
    with pytest.raises(ChapError):
        b.step({"CHAP_N": "alice", "CHAP_R": resp, "CHAP_I": "1", "CHAP_C": ichal})


def test_target_never_reuses_its_challenge():
    reg = ChallengeRegistry()
    reg.add(CHALLENGE)
    a = ChapAuthenticator(("alice", SECRET), None, reg,
                          rng=fixed_rng([b"\x2a", CHALLENGE, bytes(16)]))
    out = dict(a.step({"CHAP_A": "5"}))
    assert out["CHAP_C"] == "0x" + bytes(16).hex()


def test_registry_is_bounded():
    reg = ChallengeRegistry(capacity=3)
    for i in range(5):
        reg.add(bytes([i]))
    assert bytes([0]) not in reg and bytes([4]) in reg
