"""LIO configuration (rtslib-fb) from a declarative description.

rtslib itself is imported by target.lio.rts only when the kernel is
touched, so importing this package costs nothing where LIO is not used.
"""
from .plan import Change, Drift, LioState, plan, plan_teardown
from .rts import LioConfigurator, Report, read_state
from .spec import Acl, Chap, Description, IscsiTarget, Lun, Portal, SpecError, Tpg, Volume

__all__ = ["Acl", "Change", "Chap", "Drift", "Description", "IscsiTarget", "LioState", "Lun", "Portal",
           "SpecError", "Tpg", "Volume", "plan", "plan_teardown", "LioConfigurator", "Report", "read_state"]
