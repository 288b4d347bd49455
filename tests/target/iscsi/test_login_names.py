"""An initiator name with a newline or control character is refused at
login (it would reach log lines, ACL matching and status)."""
import pytest

from target.iscsi import pdu as P
from tests.target.iscsi.test_login import INIT, IQN, machine, req, status


@pytest.mark.parametrize("bad", ["\n", "\r", "\t", "\x7f", "\x85", "\u2028", " x"])
def test_initiator_name_with_control_characters_is_refused(bad):
    m = machine()
    lead = [("InitiatorName", INIT + bad), ("SessionType", "Normal"), ("TargetName", IQN),
            ("AuthMethod", "None")]
    s = m.process(req(0, 1, True, lead))
    assert status(s) == P.LOGIN_INITIATOR_ERROR


def test_a_plain_initiator_name_still_logs_in():
    m = machine()
    lead = [("InitiatorName", INIT), ("SessionType", "Normal"), ("TargetName", IQN),
            ("AuthMethod", "None")]
    assert status(m.process(req(0, 1, True, lead))) == (0, 0)
