"""rtslib-fb side: read a :class:`LioState` snapshot from configfs and
carry out plans. Only this module touches the kernel.

rtslib-fb is imported by the functions that use it: only a daemon with the
LIO back end needs it, and the embedded target, the CLI and the planner
(target.lio.plan) load this module without paying for it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
from dataclasses import dataclass, field

from .dbroot import Dbroot, settle
from .plan import (AclState, BackstoreState, Change, Drift, LioState, Plan, TpgState, converge, plan_teardown,
                   skipped_mappings)
from .spec import Chap, Description, Portal

log = logging.getLogger(__name__)

_TPG_ATTRS = ("generate_node_acls", "authentication", "demo_mode_write_protect", "cache_dynamic_acls")


def _chap(obj) -> Chap | None:
    uid = obj.chap_userid or ""
    pw = obj.chap_password or ""
    if not uid and not pw:
        return None
    return Chap(uid, pw, obj.chap_mutual_userid or "", obj.chap_mutual_password or "")


_SO_ATTRS = ("cmd_time_out", "qfull_time_out", "hw_queue_depth", "max_data_area_mb", "emulate_write_cache",
             "tmr_notification")


def read_state(root=None, *, extra_attributes: tuple[str, ...] = ()) -> LioState:
    from rtslib_fb import RTSRoot
    root = root or RTSRoot()
    st = LioState()
    for so in root.storage_objects:
        bs = BackstoreState(so.name, so.plugin)
        if so.plugin == "user":
            bs.config = so.config
            bs.size = so.size
            for a in _SO_ATTRS:
                try:
                    bs.attributes[a] = str(so.get_attribute(a))
                except Exception:
                    pass
        st.backstores[bs.ref] = bs
    for t in root.targets:
        if t.fabric_module.name != "iscsi":
            continue
        tpgs: dict[int, TpgState] = {}
        for tpg in t.tpgs:
            ts = TpgState(tpg.tag, bool(tpg.enable))
            for a in _TPG_ATTRS + extra_attributes:
                try:
                    ts.attributes[a] = str(tpg.get_attribute(a))
                except Exception:
                    pass
            ts.chap = _chap(tpg)
            ts.portals = {Portal(np.ip_address.strip("[]"), int(np.port)) for np in tpg.network_portals}
            for lun in tpg.luns:
                so = lun.storage_object
                ts.luns[lun.lun] = f"{so.plugin}:{so.name}"
            for acl in tpg.node_acls:
                ts.acls[acl.node_wwn] = AclState(acl.node_wwn, _chap(acl),
                                                 {m.mapped_lun: m.tpg_lun.lun for m in acl.mapped_luns})
            tpgs[tpg.tag] = ts
        st.targets[t.wwn] = tpgs
    return st


def free_hba_index(core: str) -> int:
    """The lowest HBA index no backstore directory (``core/<plugin>_<N>``)
    uses, of any plugin (rtslib-fb keeps them unique across plugins)."""
    used = set()
    for d in os.listdir(core):
        plugin, _, n = d.rpartition("_")
        if plugin and n.isdigit():
            used.add(int(n))
    return next(i for i in range(len(used) + 1) if i not in used)


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)       # differences left alone

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def lines(self) -> list[str]:
        return [str(c) for c in self.changes] or ["no changes"]


class LioConfigurator:
    """Apply a Description to the live LIO configuration (idempotent)."""

    def __init__(self, root=None) -> None:
        from rtslib_fb import RTSRoot
        # Before the first RTSRoot: agree on the dbroot with the host's tools.
        self.dbroot: Dbroot | None = settle() if root is None else None
        self.root = root or RTSRoot()

    def state(self) -> LioState:
        return read_state(self.root)

    def plan(self, desc: Description, *, prune: bool = False) -> list[Change]:
        return converge(desc, self.state(), prune=prune).changes

    def apply(self, desc: Description, *, prune: bool = False, dry_run: bool = False,
              previous: Description | None = None) -> Report:
        """``previous``: the description applied last (see target.lio.plan:
        with it, what liverestore did not make is left and reported)."""
        p = converge(desc, self.state(), prune=prune, previous=previous)
        if not dry_run:
            self._run(p.changes, desc)
        return Report(p.changes, p.drift)

    def readopt_saved(self, desc: Description) -> Report:
        """Put back the saved LUNs and mappings on our backstores that
        ``targetctl restore`` skipped (see plan.skipped_mappings); the saved
        file is the one the host's targetctl restores from:
        ``<dbroot>/saveconfig.json``."""
        if self.dbroot is None:
            return Report()
        path = os.path.join(self.dbroot.path, "saveconfig.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            return Report()
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): saved mappings of other ACLs are not checked", path, e)
            return Report()
        changes = skipped_mappings(desc, self.state(), saved)
        self._run(changes, desc)
        return Report(changes)

    def plan_against(self, desc: Description) -> Plan:
        """What applying ``desc`` again would change and leave (as the daemon
        applies it: ``desc`` is also the previous description)."""
        return converge(desc, self.state(), prune=True, previous=desc)

    def teardown(self, desc: Description, *, dry_run: bool = False) -> Report:
        changes = plan_teardown(desc, self.state())
        if not dry_run:
            self._run(changes, desc)
        return Report(changes)

    # -- carrying out -------------------------------------------------------------
    def _run(self, changes: list[Change], desc: Description) -> None:
        for c in changes:
            log.info("lio: %s", c)
            getattr(self, "_" + c.action)(*c.args)

    def _target(self, iqn: str):
        from rtslib_fb import FabricModule, Target
        return Target(FabricModule("iscsi"), iqn, mode="lookup")

    def _tpg(self, iqn: str, tag: int):
        from rtslib_fb import TPG
        return TPG(self._target(iqn), tag, mode="lookup")

    def _acl(self, iqn: str, tag: int, ini: str):
        from rtslib_fb import NodeACL
        return NodeACL(self._tpg(iqn, tag), ini, mode="lookup")

    def _so(self, ref: str):
        plugin, name = ref.split(":", 1)
        for so in self.root.storage_objects:
            if so.plugin == plugin and so.name == name:
                return so
        raise LookupError(f"no backstore {ref}")

    @staticmethod
    def _gone(fn) -> None:
        from rtslib_fb.utils import RTSLibError     # the not-in-configfs error subclasses it
        try:
            fn()
        except (RTSLibError, LookupError) as e:
            log.debug("already gone: %s", e)

    def _create_backstore(self, v) -> None:
        """With an HBA index read from configfs now, under rtslib's own index
        lock: rtslib's per-process cache of indexes goes stale when targetcli
        (another process) creates or deletes backstores, and a daemon that
        trusted it would pick a taken index or refuse a name deleted since."""
        from rtslib_fb import UserBackedStorageObject
        from rtslib_fb.tcm import lock_file
        with open(lock_file, "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            UserBackedStorageObject(v.backstore, config=v.config, size=v.size, wwn=v.wwn,
                                    hw_max_sectors=v.hw_max_sectors, control=v.control_string() or None,
                                    index=free_hba_index(os.path.join(self.root.path, "core")))

    def _set_backstore_attribute(self, name: str, k: str, v: str) -> None:
        self._so(f"user:{name}").set_attribute(k, v)

    def _delete_backstore(self, name: str) -> None:
        self._gone(lambda: self._so(f"user:{name}").delete())

    def _create_target(self, iqn: str) -> None:
        from rtslib_fb import FabricModule, Target
        Target(FabricModule("iscsi"), iqn, mode="create")

    def _delete_target(self, iqn: str) -> None:
        self._gone(lambda: self._target(iqn).delete())

    def _create_tpg(self, iqn: str, tag: int) -> None:
        from rtslib_fb import TPG
        TPG(self._target(iqn), tag, mode="create")

    def _delete_tpg(self, iqn: str, tag: int) -> None:
        self._gone(lambda: self._tpg(iqn, tag).delete())

    def _disable_tpg(self, iqn: str, tag: int) -> None:
        self._tpg(iqn, tag).enable = False

    def _enable_tpg(self, iqn: str, tag: int) -> None:
        self._tpg(iqn, tag).enable = True

    def _set_tpg_attribute(self, iqn: str, tag: int, k: str, v: str) -> None:
        self._tpg(iqn, tag).set_attribute(k, v)

    @staticmethod
    def _write_chap(obj, chap: Chap | None) -> None:
        c = chap or Chap("", "")
        obj.chap_userid = c.userid
        obj.chap_password = c.password
        obj.chap_mutual_userid = c.mutual_userid
        obj.chap_mutual_password = c.mutual_password

    def _set_tpg_chap(self, iqn: str, tag: int, chap: Chap | None) -> None:
        self._write_chap(self._tpg(iqn, tag), chap)

    def _create_portal(self, iqn: str, tag: int, p: Portal) -> None:
        from rtslib_fb import NetworkPortal
        NetworkPortal(self._tpg(iqn, tag), p.ip, p.port, mode="create")

    def _delete_portal(self, iqn: str, tag: int, p: Portal) -> None:
        from rtslib_fb import NetworkPortal
        self._gone(lambda: NetworkPortal(self._tpg(iqn, tag), p.ip, p.port, mode="lookup").delete())

    def _create_lun(self, iqn: str, tag: int, lun: int, ref: str) -> None:
        from rtslib_fb import LUN
        LUN(self._tpg(iqn, tag), lun, self._so(ref))

    def _delete_lun(self, iqn: str, tag: int, lun: int) -> None:
        from rtslib_fb import LUN
        self._gone(lambda: LUN(self._tpg(iqn, tag), lun).delete())

    def _create_acl(self, iqn: str, tag: int, ini: str) -> None:
        from rtslib_fb import NodeACL
        NodeACL(self._tpg(iqn, tag), ini, mode="create")

    def _delete_acl(self, iqn: str, tag: int, ini: str) -> None:
        self._gone(lambda: self._acl(iqn, tag, ini).delete())

    def _set_acl_chap(self, iqn: str, tag: int, ini: str, chap: Chap | None) -> None:
        self._write_chap(self._acl(iqn, tag, ini), chap)

    def _create_mapped_lun(self, iqn: str, tag: int, ini: str, m: int, tl: int) -> None:
        from rtslib_fb import MappedLUN
        MappedLUN(self._acl(iqn, tag, ini), m, tl)

    def _delete_mapped_lun(self, iqn: str, tag: int, ini: str, m: int) -> None:
        from rtslib_fb import MappedLUN
        self._gone(lambda: MappedLUN(self._acl(iqn, tag, ini), m).delete())
