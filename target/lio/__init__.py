"""LIO configuration (rtslib-fb) from a declarative description."""
from .plan import Change, LioState, plan, plan_teardown
from .spec import Acl, Chap, Description, IscsiTarget, Lun, Portal, SpecError, Tpg, Volume

__all__ = ["Acl", "Change", "Chap", "Description", "IscsiTarget", "LioState", "Lun", "Portal",
           "SpecError", "Tpg", "Volume", "plan", "plan_teardown", "LioConfigurator", "read_state"]


def __getattr__(name):            # rtslib only when the kernel side is wanted
    if name in ("LioConfigurator", "read_state", "Report"):
        from . import rts
        return getattr(rts, name)
    raise AttributeError(name)
