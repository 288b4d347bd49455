"""Description -> plan of LIO changes, over a snapshot of what exists.

Pure: :class:`LioState` is a plain snapshot (``target.lio.rts`` reads it
from configfs through rtslib-fb and applies plans), so the planning logic
is tested without a kernel. Plans are ordered: removals first (deepest
objects first), then creations (backstores, targets, TPGs, settings,
portals, LUNs, ACLs, mapped LUNs) and TPG enabling last, so a TPG never
serves half-configured.

Ownership: user backstores of our subtype (config ``liverestore/...``) and
the targets named in the description are ours. Inside our targets we
converge everything (extra TPGs, portals, LUNs, ACLs go). Targets not in
the description are never touched; our-subtype backstores not in the
description are removed only with ``prune=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .spec import SUBTYPE, Acl, Chap, Description, IscsiTarget, Portal, Tpg, Volume


@dataclass
class BackstoreState:
    name: str
    plugin: str
    config: str | None = None
    size: int = 0
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.plugin}:{self.name}"


@dataclass
class AclState:
    initiator: str
    chap: Chap | None = None
    mapped: dict[int, int] = field(default_factory=dict)      # mapped LUN -> TPG LUN


@dataclass
class TpgState:
    tag: int
    enabled: bool = False
    attributes: dict[str, str] = field(default_factory=dict)
    chap: Chap | None = None
    portals: set[Portal] = field(default_factory=set)
    luns: dict[int, str] = field(default_factory=dict)        # LUN -> "plugin:name"
    acls: dict[str, AclState] = field(default_factory=dict)


@dataclass
class LioState:
    backstores: dict[str, BackstoreState] = field(default_factory=dict)   # by "plugin:name"
    targets: dict[str, dict[int, TpgState]] = field(default_factory=dict)  # iSCSI IQN -> tag -> TPG


@dataclass(frozen=True)
class Change:
    action: str            # e.g. "create_backstore"
    path: str              # human-readable object path
    args: tuple = ()

    def __str__(self) -> str:
        return f"{self.action.replace('_', ' ')} {self.path}"


_PHASES = ["delete_mapped_lun", "delete_acl", "delete_lun", "delete_portal", "disable_tpg",
           "delete_tpg", "delete_target", "delete_backstore",
           "create_backstore", "set_backstore_attribute", "create_target", "create_tpg", "set_tpg_attribute", "set_tpg_chap",
           "create_portal", "create_lun", "create_acl", "set_acl_chap", "create_mapped_lun",
           "enable_tpg"]


def _order(changes: list[Change]) -> list[Change]:
    rank = {a: i for i, a in enumerate(_PHASES)}
    return sorted(changes, key=lambda c: rank[c.action])      # stable within a phase


def _chap_key(c: Chap | None) -> tuple:
    return (c.userid, c.password, c.mutual_userid, c.mutual_password) if c else ("", "", "", "")


def _ours(bs: BackstoreState) -> bool:
    return bs.plugin == "user" and (bs.config or "").startswith(SUBTYPE + "/")


def plan(desc: Description, state: LioState, *, prune: bool = False) -> list[Change]:
    changes: list[Change] = []
    replaced: set[str] = set()                 # backstore refs deleted (and maybe recreated)

    # -- backstores ----------------------------------------------------------------
    for v in desc.volumes:
        ref = f"user:{v.backstore}"
        cur = state.backstores.get(ref)
        if cur is not None and (cur.config != v.config or cur.size != v.size):
            changes.append(Change("delete_backstore", ref, (v.backstore,)))
            replaced.add(ref)
            cur = None
        if cur is None:
            changes.append(Change("create_backstore", ref, (v,)))
        for k, val in v.attributes:
            if cur is None or cur.attributes.get(k) != val:
                changes.append(Change("set_backstore_attribute", f"{ref}/attrib/{k}={val}", (v.backstore, k, val)))
    wanted_refs = {f"user:{v.backstore}" for v in desc.volumes}
    if prune:
        for ref, bs in sorted(state.backstores.items()):
            if _ours(bs) and ref not in wanted_refs:
                changes.append(Change("delete_backstore", ref, (bs.name,)))
                replaced.add(ref)

    # LUNs elsewhere (targets we do not manage) on a backstore we delete
    changes.extend(_foreign_luns_on(desc, state, replaced))

    # -- targets ---------------------------------------------------------------------
    for t in desc.targets:
        cur_tpgs = state.targets.get(t.iqn)
        if cur_tpgs is None:
            changes.append(Change("create_target", t.iqn, (t.iqn,)))
            cur_tpgs = {}
        wanted_tags = {tpg.tag for tpg in t.tpgs}
        for tag, ctpg in sorted(cur_tpgs.items()):
            if tag not in wanted_tags:
                changes.append(Change("delete_tpg", f"{t.iqn}/tpg{tag}", (t.iqn, tag)))
        for tpg in t.tpgs:
            changes.extend(_plan_tpg(desc, t, tpg, cur_tpgs.get(tpg.tag), replaced))
    return _order(changes)


def _delete_lun(iqn: str, tag: int, tpg: TpgState, lun: int) -> list[Change]:
    out = []
    for ini, acl in sorted(tpg.acls.items()):
        for m, tl in sorted(acl.mapped.items()):
            if tl == lun:
                out.append(Change("delete_mapped_lun", f"{iqn}/tpg{tag}/acls/{ini}/lun{m}", (iqn, tag, ini, m)))
    out.append(Change("delete_lun", f"{iqn}/tpg{tag}/lun{lun}", (iqn, tag, lun)))
    return out


def _plan_tpg(desc: Description, t: IscsiTarget, tpg: Tpg, cur: TpgState | None,
              replaced: set[str]) -> list[Change]:
    out: list[Change] = []
    base = f"{t.iqn}/tpg{tpg.tag}"
    if cur is None:
        out.append(Change("create_tpg", base, (t.iqn, tpg.tag)))
        cur = TpgState(tpg.tag)
    # settings
    for k, v in sorted(tpg.wanted_attributes().items()):
        if cur.attributes.get(k) != v:
            out.append(Change("set_tpg_attribute", f"{base}/attrib/{k}={v}", (t.iqn, tpg.tag, k, v)))
    if not tpg.acls and _chap_key(cur.chap) != _chap_key(tpg.chap):
        out.append(Change("set_tpg_chap", f"{base}/auth", (t.iqn, tpg.tag, tpg.chap)))
    # portals
    for p in sorted(cur.portals - set(tpg.portals), key=str):
        out.append(Change("delete_portal", f"{base}/np/{p.ip}:{p.port}", (t.iqn, tpg.tag, p)))
    for p in tpg.portals:
        if p not in cur.portals:
            out.append(Change("create_portal", f"{base}/np/{p.ip}:{p.port}", (t.iqn, tpg.tag, p)))
    # LUNs
    want_luns = {x.lun: f"user:{desc.volume(x.volume).backstore}" for x in tpg.luns}
    live_luns: dict[int, str] = {}
    for lun, ref in sorted(cur.luns.items()):
        if want_luns.get(lun) != ref or ref in replaced:
            out.extend(_delete_lun(t.iqn, tpg.tag, cur, lun))
        else:
            live_luns[lun] = ref
    for lun, ref in sorted(want_luns.items()):
        if lun not in live_luns:
            out.append(Change("create_lun", f"{base}/lun{lun}", (t.iqn, tpg.tag, lun, ref)))
    # ACLs
    want_acls = {a.initiator: a for a in tpg.acls}
    for ini in sorted(set(cur.acls) - set(want_acls)):
        out.append(Change("delete_acl", f"{base}/acls/{ini}", (t.iqn, tpg.tag, ini)))
    for ini, a in want_acls.items():
        ca = cur.acls.get(ini)
        if ca is None:
            out.append(Change("create_acl", f"{base}/acls/{ini}", (t.iqn, tpg.tag, ini)))
            ca = AclState(ini)
        if _chap_key(ca.chap) != _chap_key(a.chap):
            out.append(Change("set_acl_chap", f"{base}/acls/{ini}/auth", (t.iqn, tpg.tag, ini, a.chap)))
        want_map = dict(a.mapped_luns) if a.mapped_luns is not None else {n: n for n in want_luns}
        for m, tl in sorted(ca.mapped.items()):
            dead = tl not in live_luns           # its LUN goes (and takes the mapping with it)
            if not dead and want_map.get(m) != tl:
                out.append(Change("delete_mapped_lun", f"{base}/acls/{ini}/lun{m}", (t.iqn, tpg.tag, ini, m)))
        for m, tl in sorted(want_map.items()):
            if ca.mapped.get(m) != tl or tl not in live_luns:
                out.append(Change("create_mapped_lun", f"{base}/acls/{ini}/lun{m}->lun{tl}",
                                  (t.iqn, tpg.tag, ini, m, tl)))
    if not cur.enabled:
        out.append(Change("enable_tpg", base, (t.iqn, tpg.tag)))
    return out


def _foreign_luns_on(desc: Description, state: LioState, refs: set[str]) -> list[Change]:
    """Deletions of LUNs in targets the description does not manage that
    sit on backstores in ``refs`` (about to be deleted)."""
    managed = {t.iqn for t in desc.targets}
    out: list[Change] = []
    for iqn, tpgs in sorted(state.targets.items()):
        if iqn in managed:
            continue
        for tag, tpg in sorted(tpgs.items()):
            for lun, ref in sorted(tpg.luns.items()):
                if ref in refs:
                    out.extend(_delete_lun(iqn, tag, tpg, lun))
    return out


def plan_teardown(desc: Description, state: LioState) -> list[Change]:
    """Remove the described targets and volumes' backstores (if present)."""
    changes: list[Change] = []
    for t in desc.targets:
        if t.iqn in state.targets:
            changes.append(Change("delete_target", t.iqn, (t.iqn,)))
    deleting = set()
    for v in desc.volumes:
        ref = f"user:{v.backstore}"
        if ref in state.backstores:
            changes.append(Change("delete_backstore", ref, (v.backstore,)))
            deleting.add(ref)
    changes.extend(_foreign_luns_on(desc, state, deleting))
    return _order(changes)
