"""Description -> plan of LIO changes, over a snapshot of what exists.

Pure: :class:`LioState` is a plain snapshot (``target.lio.rts`` reads it
from configfs through rtslib-fb and applies plans), so the planning logic
is tested without a kernel. Plans are ordered: removals first (deepest
objects first), then creations (backstores, targets, TPGs, settings,
portals, LUNs, ACLs, mapped LUNs) and TPG enabling last, so a TPG never
serves half-configured.

Ownership: user backstores of our subtype (config ``liverestore/...``) and
the targets named in the description are ours. Targets not in the
description are never touched; our-subtype backstores not in the
description are removed only with ``prune=True``.

Inside our targets, what happens to objects the description does not have
depends on ``previous``, the description last applied:

* without it (``python -m target.lio apply``: the file is the whole truth)
  everything is converged: extra TPGs, portals, LUNs, ACLs go, settings
  are reset;
* with it (the daemon), only what the daemon itself put there is changed:
  an object is removed only if ``previous`` had it, and a setting (TPG
  attribute, CHAP, enabled, backstore attribute) is written only if it is
  new or its wanted value changed since ``previous``. Everything else that
  differs, e.g. an ACL added with targetcli, is left as it is and reported
  as :class:`Drift`, so an admin's change is never silently reverted by an
  unrelated ``volume create``. Missing objects the description wants are
  always created: serving its exports is the daemon's job.
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
class Drift:
    """A difference between LIO and the description that the plan leaves."""
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class Plan:
    changes: list[Change]
    drift: list[Drift]


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
    """Converge LIO to ``desc`` completely (see the module docstring)."""
    return converge(desc, state, prune=prune).changes


class _Previous:
    """What the last applied description said (None: converge everything)."""

    def __init__(self, previous: Description | None) -> None:
        self.full = previous is None
        prev = previous or Description()
        self.volumes = {v.backstore: v for v in prev.volumes}
        self.tpgs = {(t.iqn, tpg.tag): tpg for t in prev.targets for tpg in t.tpgs}
        self.desc = prev

    def made(self, kind: str, iqn: str = "", tag: int = 0, key=None) -> bool:
        """Did the daemon put this object there (so it may remove it)?"""
        if self.full:
            return True
        if kind == "backstore":
            return key in self.volumes
        tpg = self.tpgs.get((iqn, tag))
        if kind == "tpg":
            return tpg is not None
        if tpg is None:
            return False
        if kind == "portal":
            return key in tpg.portals
        if kind == "lun":
            return any(x.lun == key for x in tpg.luns)
        if kind == "acl":
            return any(a.initiator == key for a in tpg.acls)
        if kind == "mapped_lun":                   # key: (initiator, mapped LUN)
            return any(m == key[1] for m, _ in self.desc_mapped(tpg, key[0]))
        raise ValueError(kind)

    def desc_mapped(self, tpg: Tpg, ini: str) -> tuple[tuple[int, int], ...]:
        acl = next((a for a in tpg.acls if a.initiator == ini), None)
        if acl is None:
            return ()
        return acl.mapped_luns if acl.mapped_luns is not None else tuple((x.lun, x.lun) for x in tpg.luns)

    def wanted(self, iqn: str, tag: int, what: str, key: str = ""):
        """The value a setting had in the previous description (a sentinel if
        the object was not in it: then the setting is new, so written)."""
        tpg = self.tpgs.get((iqn, tag))
        if tpg is None:
            return _NEW
        if what == "attr":
            return tpg.wanted_attributes().get(key, _NEW)
        if what == "chap":
            return _chap_key(tpg.chap) if not tpg.acls else _NEW
        if what == "acl_chap":
            acl = next((a for a in tpg.acls if a.initiator == key), None)
            return _NEW if acl is None else _chap_key(acl.chap)
        if what == "lun":
            lun = next((x for x in tpg.luns if x.lun == int(key)), None)
            return _NEW if lun is None else f"user:{self.desc.volume(lun.volume).backstore}"
        raise ValueError(what)


_NEW = object()


def converge(desc: Description, state: LioState, *, prune: bool = False,
             previous: Description | None = None) -> Plan:
    """The changes that bring LIO to ``desc``, and the drift left alone
    (``previous``: the description applied last; see the module docstring)."""
    prev = _Previous(previous)
    changes: list[Change] = []
    drift: list[Drift] = []
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
                pv = prev.volumes.get(v.backstore)
                if cur is not None and not prev.full and pv is not None and dict(pv.attributes).get(k) == val:
                    drift.append(Drift(f"{ref}/attrib/{k}", f"is {cur.attributes.get(k)}, "
                                       f"liverestore sets {val}: left as is"))
                    continue
                changes.append(Change("set_backstore_attribute", f"{ref}/attrib/{k}={val}", (v.backstore, k, val)))
    wanted_refs = {f"user:{v.backstore}" for v in desc.volumes}
    if prune:
        for ref, bs in sorted(state.backstores.items()):
            if _ours(bs) and ref not in wanted_refs:
                if not prev.made("backstore", key=bs.name):
                    drift.append(Drift(ref, f"a {SUBTYPE} backstore liverestore did not make "
                                       f"(config {bs.config}): left as is"))
                    continue
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
                if prev.made("tpg", t.iqn, tag):
                    changes.append(Change("delete_tpg", f"{t.iqn}/tpg{tag}", (t.iqn, tag)))
                else:
                    drift.append(Drift(f"{t.iqn}/tpg{tag}", "a TPG not in liverestore's configuration: left as is"))
        for tpg in t.tpgs:
            changes.extend(_plan_tpg(desc, t, tpg, cur_tpgs.get(tpg.tag), replaced, prev, drift))
    return Plan(_order(changes), drift)


def _delete_lun(iqn: str, tag: int, tpg: TpgState, lun: int) -> list[Change]:
    out = []
    for ini, acl in sorted(tpg.acls.items()):
        for m, tl in sorted(acl.mapped.items()):
            if tl == lun:
                out.append(Change("delete_mapped_lun", f"{iqn}/tpg{tag}/acls/{ini}/lun{m}", (iqn, tag, ini, m)))
    out.append(Change("delete_lun", f"{iqn}/tpg{tag}/lun{lun}", (iqn, tag, lun)))
    return out


def _plan_tpg(desc: Description, t: IscsiTarget, tpg: Tpg, cur: TpgState | None,
              replaced: set[str], prev: _Previous, drift: list[Drift]) -> list[Change]:
    out: list[Change] = []
    base = f"{t.iqn}/tpg{tpg.tag}"
    fresh = cur is None
    if cur is None:
        out.append(Change("create_tpg", base, (t.iqn, tpg.tag)))
        cur = TpgState(tpg.tag)

    def keep(path: str, live, wanted, before) -> bool:
        """True (and a Drift) when a live setting differs from an unchanged wish."""
        if fresh or prev.full or before is _NEW or before != wanted:
            return False
        drift.append(Drift(path, f"differs from liverestore's configuration ({live!s:.60}): left as is"))
        return True

    # settings
    for k, v in sorted(tpg.wanted_attributes().items()):
        if cur.attributes.get(k) != v and not keep(f"{base}/attrib/{k}", cur.attributes.get(k), v,
                                                     prev.wanted(t.iqn, tpg.tag, "attr", k)):
            out.append(Change("set_tpg_attribute", f"{base}/attrib/{k}={v}", (t.iqn, tpg.tag, k, v)))
    if not tpg.acls and _chap_key(cur.chap) != _chap_key(tpg.chap) \
            and not keep(f"{base}/auth", "CHAP settings", _chap_key(tpg.chap), prev.wanted(t.iqn, tpg.tag, "chap")):
        out.append(Change("set_tpg_chap", f"{base}/auth", (t.iqn, tpg.tag, tpg.chap)))
    # portals
    for p in sorted(cur.portals - set(tpg.portals), key=str):
        if prev.made("portal", t.iqn, tpg.tag, p):
            out.append(Change("delete_portal", f"{base}/np/{p.ip}:{p.port}", (t.iqn, tpg.tag, p)))
        else:
            drift.append(Drift(f"{base}/np/{p.ip}:{p.port}", "a portal not in liverestore's configuration: "
                               "left as is"))
    for p in tpg.portals:
        if p not in cur.portals:
            out.append(Change("create_portal", f"{base}/np/{p.ip}:{p.port}", (t.iqn, tpg.tag, p)))
    # LUNs
    want_luns = {x.lun: f"user:{desc.volume(x.volume).backstore}" for x in tpg.luns}
    live_luns: dict[int, str] = {}
    for lun, ref in sorted(cur.luns.items()):
        if ref in replaced:
            out.extend(_delete_lun(t.iqn, tpg.tag, cur, lun))      # its backstore goes: so must it
        elif want_luns.get(lun) == ref:
            live_luns[lun] = ref
        elif lun in want_luns and keep(f"{base}/lun{lun}", ref, want_luns[lun],
                                       prev.wanted(t.iqn, tpg.tag, "lun", str(lun))):
            live_luns[lun] = ref                                   # an admin's LUN in our slot
        elif lun in want_luns or prev.made("lun", t.iqn, tpg.tag, lun):
            out.extend(_delete_lun(t.iqn, tpg.tag, cur, lun))
        else:
            drift.append(Drift(f"{base}/lun{lun}", f"a LUN ({ref}) not in liverestore's configuration: "
                               "left as is"))
            live_luns[lun] = ref
    for lun, ref in sorted(want_luns.items()):
        if lun not in live_luns:
            out.append(Change("create_lun", f"{base}/lun{lun}", (t.iqn, tpg.tag, lun, ref)))
    # ACLs
    want_acls = {a.initiator: a for a in tpg.acls}
    for ini in sorted(set(cur.acls) - set(want_acls)):
        if prev.made("acl", t.iqn, tpg.tag, ini):
            out.append(Change("delete_acl", f"{base}/acls/{ini}", (t.iqn, tpg.tag, ini)))
        else:
            drift.append(Drift(f"{base}/acls/{ini}", "an ACL not in liverestore's configuration: left as is"))
    for ini, a in want_acls.items():
        ca = cur.acls.get(ini)
        new_acl = ca is None
        if ca is None:
            out.append(Change("create_acl", f"{base}/acls/{ini}", (t.iqn, tpg.tag, ini)))
            ca = AclState(ini)
        if _chap_key(ca.chap) != _chap_key(a.chap) and (new_acl or not keep(
                f"{base}/acls/{ini}/auth", "CHAP settings", _chap_key(a.chap),
                prev.wanted(t.iqn, tpg.tag, "acl_chap", ini))):
            out.append(Change("set_acl_chap", f"{base}/acls/{ini}/auth", (t.iqn, tpg.tag, ini, a.chap)))
        want_map = dict(a.mapped_luns) if a.mapped_luns is not None else {n: n for n in want_luns}
        for m, tl in sorted(ca.mapped.items()):
            dead = tl not in live_luns           # its LUN goes (and takes the mapping with it)
            if not dead and want_map.get(m) != tl:
                if m in want_map or prev.made("mapped_lun", t.iqn, tpg.tag, (ini, m)):
                    out.append(Change("delete_mapped_lun", f"{base}/acls/{ini}/lun{m}", (t.iqn, tpg.tag, ini, m)))
                else:
                    drift.append(Drift(f"{base}/acls/{ini}/lun{m}", "a mapped LUN not in liverestore's "
                                       "configuration: left as is"))
        for m, tl in sorted(want_map.items()):
            if ca.mapped.get(m) != tl or tl not in live_luns:
                out.append(Change("create_mapped_lun", f"{base}/acls/{ini}/lun{m}->lun{tl}",
                                  (t.iqn, tpg.tag, ini, m, tl)))
    if not cur.enabled and not keep(base, "disabled", True, True if (t.iqn, tpg.tag) in prev.tpgs else _NEW):
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


def skipped_mappings(desc: Description, state: LioState, saved: dict) -> list[Change]:
    """The LUNs and mapped LUNs of a saved LIO configuration (targetcli
    saveconfig's JSON) that ``targetctl restore`` had to skip because they
    sit on our backstores.

    With tcmu-runner up, restore cannot recreate our backstores (the kernel
    waits for tcmu-runner's reply to the new device, and it refuses a
    subtype it does not serve), so it skips their LUNs and every mapped LUN
    on them, also those an admin made. The daemon's start recreates its
    backstores and its targets' LUNs; this puts back the rest from the saved
    file: in our targets, the mappings of the other ACLs onto those LUNs; in
    an admin's own iSCSI target, the saved LUNs on our backstores (the
    admin's intent; in our targets the daemon's LUNs are the wanted ones)
    and its ACLs' mappings onto them. Targets, TPGs and ACLs were restored
    (they do not depend on a backstore). Only what has a live TPG and ACL,
    a free index, and a TPG LUN live (or put back) on the same backstore as
    saved is returned."""
    ours = {t.iqn: {tpg.tag: tpg for tpg in t.tpgs} for t in desc.targets}
    our_refs = {f"user:{v.backstore}" for v in desc.volumes}
    out: list[Change] = []
    for t in _dicts(saved.get("targets") if isinstance(saved, dict) else None):
        iqn = t.get("wwn")
        if t.get("fabric") != "iscsi" or not isinstance(iqn, str):
            continue
        for stpg in _dicts(t.get("tpgs")):
            tag = stpg.get("tag")
            if not isinstance(tag, int):
                continue
            live = state.targets.get(iqn, {}).get(tag)
            if live is None or (iqn in ours and tag not in ours[iqn]):
                continue
            managed = {a.initiator for a in ours[iqn][tag].acls} if iqn in ours else set()
            saved_luns = {x.get("index"): _saved_ref(x.get("storage_object")) for x in _dicts(stpg.get("luns"))}
            luns = dict(live.luns)
            if iqn not in ours:
                for idx, ref in saved_luns.items():
                    if isinstance(idx, int) and ref in our_refs and idx not in luns and ref in state.backstores:
                        out.append(Change("create_lun", f"{iqn}/tpg{tag}/lun{idx}", (iqn, tag, idx, ref)))
                        luns[idx] = ref
            for acl in _dicts(stpg.get("node_acls")):
                ini = acl.get("node_wwn")
                if not isinstance(ini, str) or ini in managed or ini not in live.acls:
                    continue
                for m in _dicts(acl.get("mapped_luns")):
                    idx, tl = m.get("index"), m.get("tpg_lun")
                    if not isinstance(idx, int) or not isinstance(tl, int) or idx in live.acls[ini].mapped \
                            or luns.get(tl) is None or luns.get(tl) != saved_luns.get(tl):
                        continue
                    out.append(Change("create_mapped_lun", f"{iqn}/tpg{tag}/acls/{ini}/lun{idx}->lun{tl}",
                                      (iqn, tag, ini, idx, tl)))
    return out


def _dicts(x) -> list[dict]:
    """The objects of a list in a hand-editable file; anything else, none."""
    return [i for i in x if isinstance(i, dict)] if isinstance(x, list) else []


def _saved_ref(path) -> str | None:
    """"/backstores/user/NAME" (saveconfig's LUN reference) -> "user:NAME"."""
    if not isinstance(path, str):
        return None
    parts = path.strip("/").split("/")
    return f"{parts[1]}:{parts[2]}" if len(parts) == 3 and parts[0] == "backstores" else None


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
