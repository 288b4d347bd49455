"""UnitAttentions: per-nexus FIFOs."""
from target.scsi import constants as c
from target.scsi.ua import UnitAttentions


def test_new_nexus_starts_with_power_on_and_fifo_order():
    ua = UnitAttentions()
    ua.register("a")
    ua.register("a")                                  # idempotent
    ua.establish(c.ASC_CAPACITY_DATA_HAS_CHANGED)
    ua.establish(c.ASC_MEDIUM_MAY_HAVE_CHANGED)
    ua.establish(c.ASC_CAPACITY_DATA_HAS_CHANGED)     # already pending: once
    assert ua.pending("a") == [c.ASC_POWER_ON_RESET, c.ASC_CAPACITY_DATA_HAS_CHANGED,
                               c.ASC_MEDIUM_MAY_HAVE_CHANGED]
    assert ua.pop("a") == c.ASC_POWER_ON_RESET
    assert ua.pop("unknown") is None


def test_establish_targets_and_exclusion():
    ua = UnitAttentions()
    for k in "abc":
        ua.register(k)
        ua.pop(k)
    ua.establish(c.ASC_MODE_PARAMETERS_CHANGED, exclude="a")
    ua.establish(c.ASC_RESERVATIONS_PREEMPTED, ["c", "zz"])   # unknown nexus ignored
    assert ua.pending("a") == []
    assert ua.pending("b") == [c.ASC_MODE_PARAMETERS_CHANGED]
    assert ua.pending("c") == [c.ASC_MODE_PARAMETERS_CHANGED, c.ASC_RESERVATIONS_PREEMPTED]
    assert not ua.known("zz")
    ua.clear("c", c.ASC_MODE_PARAMETERS_CHANGED)
    assert ua.pending("c") == [c.ASC_RESERVATIONS_PREEMPTED]


def test_reset_replaces_pending_and_queue_is_bounded():
    ua = UnitAttentions()
    ua.register("a")
    for i in range(40):
        ua.establish((0x2A, i))
    assert len(ua.pending("a")) == 16
    assert ua.pending("a")[-1] == (0x2A, 39)
    ua.reset(c.ASC_BUS_DEVICE_RESET)
    assert ua.pending("a") == [c.ASC_BUS_DEVICE_RESET]
    ua.forget("a")
    assert not ua.known("a") and ua.nexuses() == []
