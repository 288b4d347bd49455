"""The node tree of `liverestore shell` (configshell-fb).

    /
    +- volumes/<volume>                     size, role, access
    +- pairs/<source>/<clone>               state, restore/sync progress
    +- groups/<group>                       consistency groups and their members
    +- iscsi/<iqn>/tpg1/{luns,acls,portals}

Every node is a view of one `status` reply; commands call the control API
and print one line. CHAP secrets never reach the shell: the daemon returns
them masked, and command lines that set one are kept out of the history.
"""
from __future__ import annotations

import json
import os
import readline
from typing import Any

from configshell import ConfigNode, ConfigShell, ExecutionError
from pyparsing import ParseException

from restore_core.throttle import KNOBS

from ..cli_group import follow_members
from ..cli_shared import client_path, wait_job, write_private
from ..control import ControlError
from ..fmt import SECRET, eta, human, plural
from ..follow import Outcome


def pair_summary(p: dict[str, Any]) -> tuple[str, bool | None]:
    """'restoring 37% 190/512 extents, 2.0 MiB/s, eta 0:00:12 (protected)'."""
    pr = p["progress"]
    undo = ", undo kept (abort or commit)" if pr.get("undo") and pr["job"] is None else ""
    if pr["job"] is None:
        if p["state"] == "fractured":
            return f"fractured, {plural(pr['delta_extents'], 'extent')} differ{undo}", True
        return p["state"], True
    total = pr["extents_total"] or 0
    pct = 100 * pr["extents_done"] // total if total else 100
    text = f"{p['state']} {pct}% {pr['extents_done']}/{plural(total, 'extent')}"
    if pr["job"] == "restore":
        text += " (protected)" if pr["protected"] else " (unprotected)"
    if pr["error"]:
        return f"{text} ERROR: {pr['error']}", False
    if pr["paused"]:
        return f"{text} paused", None
    return f"{text}, {human(pr['rate'])}/s, eta {eta(pr['eta'])}", True


class LiverestoreShell(ConfigShell):
    def __init__(self, client: Any, preferences_dir: str | None = None) -> None:
        super().__init__(preferences_dir)
        # configshell logs every command line to a file at debug level; a
        # line may carry a CHAP secret, so no log file.
        self.prefs["logfile"] = None
        self.prefs["loglevel_file"] = "critical"
        self.client = client
        self.failed = False
        Root(self)
        self.refresh()             # so that the last session's path can be found again

    def call(self, op: str, **args: Any) -> Any:
        try:
            return self.client.call(op, **args)
        except ControlError as e:
            raise ExecutionError(str(e)) from None

    def refresh(self) -> None:
        """Rebuild the tree from the daemon; stay at the current path, or the
        nearest ancestor of it that still exists."""
        path = self._current_node.path if self._current_node else "/"
        self._root_node.refresh(self.call("status"))
        while True:
            try:
                self._current_node = self._root_node.get_node(path)
                return
            except ValueError:
                path = path.rsplit("/", 1)[0] or "/"

    def run_line(self, cmdline: str) -> None:
        """Run one command line; an error is one line on stderr, never a traceback."""
        self.failed = False
        try:
            self.refresh()
            super().run_cmdline(cmdline)
        except (ExecutionError, ControlError) as e:
            self.error(str(e))
        except ParseException as e:
            self.error(f"cannot parse {cmdline!r}: {e.msg}")
        except Exception as e:  # noqa: BLE001 - the shell keeps running
            self.error(f"internal error: {type(e).__name__}: {e}")

    def error(self, msg: str) -> None:
        self.failed = True
        self.con.display(f"error: {msg}", error=True)

    def run_cmdline(self, cmdline: str) -> None:        # the interactive loop's entry
        self.run_line(cmdline)
        if "secret" in cmdline and self._save_history:
            n = readline.get_current_history_length()
            if n:
                readline.remove_history_item(n - 1)

    def _complete(self, text, state):
        if state == 0:
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - completion must never raise
                pass
        return super()._complete(text, state)


class Node(ConfigNode):
    """A view of part of the status reply; `data` is that part."""

    def __init__(self, name: str, parent: ConfigNode, data: Any = None) -> None:
        super().__init__(name, parent)
        self.data = data

    def call(self, op: str, **args: Any) -> Any:
        return self.shell.call(op, **args)

    def say(self, text: str) -> None:
        self.shell.con.display(text)

    def sync(self, wanted: dict[str, tuple[type, Any]]) -> None:
        """Make the children exactly `wanted` (name -> (class, data)),
        keeping existing node objects so the shell's current node survives."""
        have = {c.name: c for c in self.children}
        for name, child in have.items():
            if name not in wanted or type(child) is not wanted[name][0]:
                self.remove_child(child)
        for name, (cls, data) in wanted.items():
            child = have.get(name)
            if child is None or child not in self.children:
                child = cls(name, self, data)
            child.data = data
            child.refresh(data)

    def refresh(self, data: Any) -> None:
        pass

    # get/set of our own groups: one API call for all parameters of a `set`,
    # so that e.g. a CHAP user and secret change together.
    def ui_command_set(self, group=None, **parameter):
        '''
        Sets one or more configuration parameters in the given group.
        Run with no parameter nor group to list all available groups, or
        with just a group name to list its parameters.

        Example: set throttle rate=200M depth=4
        '''
        if group in (None, "global") or not parameter:
            return super().ui_command_set(group, **parameter)
        if group not in self.list_config_groups():
            raise ExecutionError(f"Unknown configuration group: {group}")
        values = {}
        for name, value in parameter.items():
            if name not in self.list_group_params(group):
                raise ExecutionError(f"Unknown parameter {name} in group '{group}'.")
            p_def = self.get_group_param(group, name)
            if not p_def["writable"]:
                raise ExecutionError(f"Parameter {name} is read-only.")
            try:
                values[name] = self.get_type_method(p_def["type"])(value)
            except ValueError as e:
                raise ExecutionError(f"Not setting {name}! {e}") from None
        self.set_group(group, values)
        self.shell.refresh()                  # our data is now the daemon's answer
        getter = self.get_group_getter(group)
        for name in values:
            value = getter(name)
            self.say(f"Parameter {name} is now '{'' if value is None else value}'.")

    def set_group(self, group: str, values: dict[str, Any]) -> None:
        raise ExecutionError(f"Parameters of group '{group}' are read-only.")


class Root(Node):
    def __init__(self, shell: LiverestoreShell) -> None:
        ConfigNode.__init__(self, "/", shell=shell)
        self.data: dict[str, Any] = {}
        Volumes("volumes", self)
        Pairs("pairs", self)
        Groups("groups", self)
        Iscsi("iscsi", self)

    def refresh(self, status: dict[str, Any]) -> None:
        self.data = status
        for child in self.children:
            child.refresh(status)

    def summary(self):
        return f"portals {', '.join(self.data.get('portals', []))}", None

    def ui_command_saveconfig(self, savefile=None):
        '''
        Saves the whole configuration (secrets included) as JSON to
        savefile, owner-readable only; the default is saveconfig.json in
        the daemon's state directory. The daemon's own database is always
        up to date: this is a copy for backups and `restoreconfig`.
        '''
        path = savefile or os.path.join(self.data.get("state_dir", "."), "saveconfig.json")
        try:
            write_private(path, json.dumps(self.call("saveconfig"), indent=2, sort_keys=True))
        except OSError as e:
            raise ExecutionError(f"cannot write {path}: {e.strerror or e}") from None
        self.say(f"Configuration saved to {path}")

    def ui_command_restoreconfig(self, savefile):
        '''
        Creates what the saved configuration in savefile has and this daemon
        lacks (volumes, pairs, exports). Pairs come back fractured with every
        extent to copy.
        '''
        try:
            with open(savefile) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise ExecutionError(f"cannot read {savefile}: {e}") from None
        made = self.call("restoreconfig", config=cfg)["created"]
        self.say("Created " + ", ".join(f"{len(v)} {k}" for k, v in made.items()) + ".")


# -- volumes ----------------------------------------------------------------------------
class Volumes(Node):
    def refresh(self, status):
        self.data = status["volumes"]
        self.sync({v["name"]: (Volume, v) for v in self.data})

    def summary(self):
        return plural(len(self.data or []), "volume"), None

    def ui_command_create(self, name, size=None, path=None, extent_size="64K", rbd=None,
                          ceph_conf=None, ceph_id=None):
        '''
        Creates a volume: a new image file of the given size (e.g. 10G), or
        an existing file or block device given by path, adopted as it is
        (its size is the volume's; give no size, or exactly that one).
        With rbd=POOL/IMAGE the volume is a Ceph RBD image (created with
        size if missing, else adopted at its own size), reached with
        ceph_conf (default /etc/ceph/ceph.conf) and ceph_id (default admin).

        Example: create db1 size=10G
        Example: create clone1 rbd=rbd/clone1 size=10G
        '''
        rbd_args = {k: v for k, v in (("rbd", rbd), ("ceph_conf", client_path(ceph_conf)),
                                      ("ceph_id", ceph_id)) if v is not None}
        v = self.call("volume.create", name=name, size=size, path=client_path(path),
                      extent_size=extent_size, **rbd_args)
        self.say(f"Created volume {v['name']}: {human(v['size'])} at {v['path']}.")

    def ui_complete_create(self, parameters, text, current_param):
        if current_param in ("name",):
            return []
        return [k + "=" for k in ("size", "path", "extent_size", "rbd", "ceph_conf", "ceph_id")
                if k.startswith(text) and k not in parameters]

    def ui_command_delete(self, name):
        '''
        Forgets a volume; its image file stays where it is.
        '''
        r = self.call("volume.delete", name=name)
        self.say(f"Deleted volume {r['deleted']} ({r['note']}).")

    def ui_complete_delete(self, parameters, text, current_param):
        return [c.name for c in self.children if c.name.startswith(text)]


class Volume(Node):
    ATTRS = ("size", "extent_size", "path", "kind", "role", "access", "exported_by")

    def __init__(self, name, parent, data=None):
        super().__init__(name, parent, data)
        for a in self.ATTRS:
            self.define_config_group_param("attribute", a, "string", f"the volume's {a}",
                                           writable=False)

    def summary(self):
        v = self.data
        text = f"{human(v['size'])}, {v['role']}, {v['access']}, extent {human(v['extent_size'])}"
        if v.get("kind") == "rbd":
            text += f", on {v['path'].split(':')[1]} (RBD)"
        if v.get("exported_by"):
            text += f", exported by {v['exported_by']}"
        if v.get("access_reason"):
            text += f" ({v['access_reason']})"
        return text, True if v.get("access") == "read-write" else None

    def ui_command_resize(self, size):
        '''
        Grows the volume to size (e.g. 20G); it never shrinks. A block
        device must be grown first. Not while the volume is in a pair.
        '''
        v = self.call("volume.resize", name=self.name, size=size)
        self.say(f"Volume {v['name']} is now {human(v['size'])}.")

    def ui_getgroup_attribute(self, name):
        value = self.data.get(name)
        if name in ("size", "extent_size"):
            return f"{value} ({human(value)})"
        return None if value is None else str(value)


# -- pairs ------------------------------------------------------------------------------
class Pairs(Node):
    def refresh(self, status):
        self.data = status["pairs"]
        by_source: dict[str, list] = {}
        for p in self.data:
            by_source.setdefault(p["source"], []).append(p)
        self.sync({s: (Source, ps) for s, ps in by_source.items()})

    def summary(self):
        busy = sum(1 for p in self.data or [] if p["progress"]["job"])
        return f"{plural(len(self.data or []), 'pair')}, {busy} busy", None

    def ui_command_create(self, source, clone, sync="true", extent_size=None):
        '''
        Pairs clone with source and, unless sync=false, copies the source
        to the clone in the background (the pair is then synchronized).
        With sync=false the pair starts fractured with every extent marked
        different.
        '''
        sync_ = self.ui_eval_param(sync, "bool", True)
        p = self.call("pair.create", source=source, clone=clone, sync=sync_,
                      extent_size=extent_size)
        self.say(f"Created pair {p['source']}/{p['clone']}: {pair_summary(p)[0]}.")

    def ui_complete_create(self, parameters, text, current_param):
        if current_param in ("source", "clone"):
            vols = [v["name"] for v in self.get_root().data.get("volumes", [])]
            return [v for v in vols if v.startswith(text)]
        if current_param == "sync":
            return [x for x in ("true", "false") if x.startswith(text)]
        return []

    def ui_command_delete(self, pair, force="false"):
        '''
        Removes a pairing (both volumes stay). pair is the clone's name or
        source/clone; force=true even while a restore runs.
        '''
        r = self.call("pair.delete", pair=pair, force=self.ui_eval_param(force, "bool", False))
        self.say(f"Deleted pair {r['deleted']}.")

    def ui_complete_delete(self, parameters, text, current_param):
        if current_param == "pair":
            return [p["clone"] for p in self.data or [] if p["clone"].startswith(text)]
        return []


class Source(Node):
    def refresh(self, pairs):
        self.sync({p["clone"]: (PairNode, p) for p in pairs})

    def summary(self):
        return f"source of {len(self.data)} clone{'s' if len(self.data) != 1 else ''}", None


class PairNode(Node):
    def __init__(self, name, parent, data=None):
        super().__init__(name, parent, data)
        for k in KNOBS:
            self.define_config_group_param("throttle", k.name,
                                           "string" if k.size else "number", k.help)
        for k in ("state", "source", "clone", "size", "extent_size", "delta_extents"):
            self.define_config_group_param("pair", k, "string", f"the pair's {k}",
                                           writable=False)

    def summary(self):
        return pair_summary(self.data)

    def ui_setgroup_throttle(self, name, value):
        self.set_group("throttle", {name: value})

    def ui_getgroup_throttle(self, name):
        return self.data["throttle"][name]

    def ui_getgroup_pair(self, name):
        if name == "delta_extents":
            return str(self.data["progress"]["delta_extents"])
        return str(self.data[name])

    def set_group(self, group, values):
        if group != "throttle":
            super().set_group(group, values)
        self.call("pair.throttle", pair=self.data["id"], **values)

    def _do(self, op: str, verb: str, **args: Any) -> None:
        p = self.call(op, pair=self.data["id"], **args)
        self.say(f"{verb} {p['source']}/{p['clone']}: {pair_summary(p)[0]}.")

    def ui_command_restore(self, mode="protected", keep_undo="false", undo_volume=None):
        '''
        Copies the clone back onto the source while hosts keep using the
        source. protected (the default): host writes during the restore are
        kept and the clone is not touched, the pair ends fractured.
        unprotected: host writes are mirrored to the clone, the pair ends
        synchronized. keep_undo=true (protected only) saves what the
        restore overwrites, to a sparse image beside the source or to
        undo_volume, so that `abort` can put it back until `commit`.
        '''
        if mode not in ("protected", "unprotected"):
            raise ExecutionError("restore takes 'protected' (the default) or 'unprotected'")
        self._do("pair.restore", "Restoring", protected=mode == "protected",
                 keep_undo=self.ui_eval_param(keep_undo, "bool", False), undo_volume=undo_volume)

    def ui_command_abort(self):
        '''
        Undoes a keep_undo restore (running or finished): puts back what it
        overwrote, except extents hosts wrote since it began, in the
        background while hosts keep using the source (`wait` follows it).
        '''
        self._do("pair.abort", "Aborting")

    def ui_command_commit(self):
        '''
        Keeps a finished keep_undo restore: its undo image is discarded.
        '''
        self._do("pair.commit", "Committed")

    def ui_complete_restore(self, parameters, text, current_param):
        return [m for m in ("protected", "unprotected") if m.startswith(text)]

    def ui_command_sync(self, mode="delta"):
        '''
        Copies the source to the clone: the extents that differ, or every
        extent with `sync full`.
        '''
        if mode not in ("delta", "full"):
            raise ExecutionError("sync takes 'delta' (the default) or 'full'")
        self._do("pair.sync", "Syncing", full=mode == "full")

    def ui_complete_sync(self, parameters, text, current_param):
        return [m for m in ("delta", "full") if m.startswith(text)]

    def ui_command_wait(self):
        '''
        Follows the running sync or restore to its end: a live progress bar
        on a terminal, a line every few seconds otherwise. Ctrl-C stops
        following (the job goes on).
        '''
        try:
            first = self.shell.client.call("pair.show", pair=self.data["id"])
            f = wait_job(self.shell.client, first, False)
        except ControlError as e:
            raise ExecutionError(str(e)) from None
        if f.outcome is not Outcome.FINISHED:
            raise ExecutionError(f.message)
        p = f.pair
        ran = first["progress"]["job"] is not None
        self.say(f"{f.message}." if ran else f"{p['source']}/{p['clone']}: {pair_summary(p)[0]}.")

    def ui_command_fracture(self):
        '''
        Splits the clone off the source; both stay usable and their writes
        are tracked.
        '''
        self._do("pair.fracture", "Fractured")

    def ui_command_pause(self):
        '''
        Holds the background copy (host I/O keeps its copy-on-demand).
        '''
        self._do("pair.pause", "Paused")

    def ui_command_resume(self):
        '''
        Continues a paused or failed background copy.
        '''
        self._do("pair.resume", "Resumed")


# -- consistency groups ------------------------------------------------------------------
class Groups(Node):
    def refresh(self, status):
        self.data = status.get("groups", [])
        self.sync({g["name"]: (GroupNode, g) for g in self.data})

    def summary(self):
        return f"{len(self.data or [])} groups", None

    def ui_command_create(self, name, *pairs):
        '''
        Makes a consistency group of pairs (clone names or source/clone): it
        fractures and restores them at one instant. A pair is in at most one
        group, and refuses its own fracture, sync, restore, pause, resume and
        delete while it is in one.
        '''
        g = self.call("group.create", name=name, pairs=list(pairs))
        self.say(f"Created group {g['name']}: {group_summary(g)}.")

    def ui_command_delete(self, name):
        '''
        Forgets a group; its pairs stay as they are, free.
        '''
        self.call("group.delete", name=name)
        self.say(f"Deleted group {name}.")

    def ui_complete_delete(self, parameters, text, current_param):
        return [g["name"] for g in self.data or [] if g["name"].startswith(text)]


def group_summary(g: dict[str, Any]) -> str:
    return f"{g['state']}, pairs {', '.join(g['pairs']) or '(none)'}"


class GroupNode(Node):
    def summary(self):
        return group_summary(self.data), None if self.data.get("damaged") is None else False

    def _do(self, op: str, verb: str, **args: Any) -> None:
        g = self.call(op, name=self.data["name"], **args)
        self.say(f"{verb} group {g['name']}: {group_summary(g)}.")

    def ui_command_add(self, *pairs):
        '''
        Puts pairs into the group.
        '''
        self._do("group.add", "Added to", pairs=list(pairs))

    def ui_command_remove(self, *pairs):
        '''
        Takes pairs out of the group; they become free.
        '''
        self._do("group.remove", "Removed from", pairs=list(pairs))

    def ui_command_fracture(self):
        '''
        Splits every member's clone off at one instant.
        '''
        self._do("group.fracture", "Fractured")

    def ui_command_sync(self, mode="delta"):
        '''
        Copies source to clone on every member (`sync full`: every extent).
        '''
        if mode not in ("delta", "full"):
            raise ExecutionError("sync takes 'delta' (the default) or 'full'")
        self._do("group.sync", "Syncing", full=mode == "full")

    def ui_command_restore(self, mode="protected", keep_undo="false"):
        '''
        Starts restoring every member from its clone at one instant, while
        hosts keep using the sources (see /pairs ... restore for the modes
        and keep_undo).
        '''
        if mode not in ("protected", "unprotected"):
            raise ExecutionError("restore takes 'protected' (the default) or 'unprotected'")
        self._do("group.restore", "Restoring", protected=mode == "protected",
                 keep_undo=self.ui_eval_param(keep_undo, "bool", False))

    def ui_command_abort(self):
        '''
        Undoes every member's keep_undo restore from one instant on.
        '''
        self._do("group.abort", "Aborting")

    def ui_command_commit(self):
        '''
        Keeps every member's keep_undo restore (discards the undo images).
        '''
        self._do("group.commit", "Committed")

    def ui_command_pause(self):
        '''
        Holds every member's background copy.
        '''
        self._do("group.pause", "Paused")

    def ui_command_resume(self):
        '''
        Continues every member's paused or failed background copy.
        '''
        self._do("group.resume", "Resumed")

    def ui_command_wait(self):
        '''
        Follows every member's job to its end.
        '''
        try:
            stopped = follow_members(self.shell.client, self.data, False)
        except ControlError as e:
            raise ExecutionError(str(e)) from None
        if stopped is not None:
            raise ExecutionError(stopped.message)
        self._do("group.show", "Done:")


# -- iSCSI -----------------------------------------------------------------------------
class Iscsi(Node):
    drift: list[str] = []       # from the status reply; LIO back end only
    def refresh(self, status):
        self.data = status["exports"]
        self.drift = (status.get("iscsi") or {}).get("drift") or []
        self.sync({e["iqn"]: (Target, {**e, "volumes": status["volumes"]}) for e in self.data})

    def summary(self):
        if self.drift:      # LIO changed outside liverestore: `drift` lists it
            return f"{plural(len(self.data or []), 'target')}, {len(self.drift)} LIO drift", False
        return plural(len(self.data or []), "target"), None

    def ui_command_drift(self):
        '''
        Lists what differs in LIO from liverestore's exports: changes made
        with targetcli, which the daemon leaves as they are, and what is
        missing, which it recreates at its next change or start.
        '''
        for line in self.drift or ["no drift"]:
            self.say(line)

    def ui_command_create(self, iqn):
        '''
        Creates an iSCSI target (with its tpg1) that exports no LUN yet.
        '''
        e = self.call("export.create", iqn=iqn)
        self.say(f"Created target {e['iqn']}." + (f" WARNING: {e['warning']}."
                                                  if e.get("warning") else ""))

    def ui_command_delete(self, iqn, force="false"):
        '''
        Removes an iSCSI target; its volumes stay. Refused while initiators
        are logged in (see its tpg1/sessions) unless force=true.
        '''
        if force not in ("true", "false"):
            raise ExecutionError("force takes true or false")
        r = self.call("export.delete", iqn=iqn, force=force == "true")
        cut = len(r.get("cut_off") or [])
        self.say(f"Deleted target {iqn}." + (f" Cut off {plural(cut, 'session')}." if cut else ""))

    def ui_complete_delete(self, parameters, text, current_param):
        return [c.name for c in self.children if c.name.startswith(text)]


class Target(Node):
    def refresh(self, e):
        self.sync({f"tpg{e['tpgt']}": (Tpg, e)})

    def summary(self):
        return "1 TPG", None


class Tpg(Node):
    AUTH = ("chap_user", "chap_secret", "mutual_user", "mutual_secret")

    def __init__(self, name, parent, data=None):
        super().__init__(name, parent, data)
        for k in self.AUTH:
            self.define_config_group_param(
                "auth", k, "string",
                {"chap_user": "CHAP user the initiator logs in as",
                 "chap_secret": "CHAP secret (12-255 characters; shown masked)",
                 "mutual_user": "user the target answers mutual CHAP as",
                 "mutual_secret": "mutual CHAP secret (shown masked)"}[k])

    def refresh(self, e):
        self.sync({"luns": (Luns, e), "acls": (Acls, e), "portals": (Portals, e),
                   "sessions": (Sessions, e)})

    def ui_setgroup_auth(self, name, value):
        self.set_group("auth", {name: value})

    @property
    def iqn(self) -> str:
        return self.data["iqn"]

    def summary(self):
        e = self.data
        auth = "mutual CHAP" if e["mutual_chap"] else ("CHAP" if e["chap"] else "no auth")
        if e["chap"]:
            auth += f" user {e['chap']['user']}"
        return auth, True

    def ui_getgroup_auth(self, name):
        chap, mutual = self.data["chap"], self.data["mutual_chap"]
        pick = chap if name.startswith("chap") else mutual
        if not pick:
            return None
        # The daemon returns secrets masked; never show more than that.
        return pick["user"] if name.endswith("user") else SECRET

    def set_group(self, group, values):
        if group != "auth":
            super().set_group(group, values)
        self.call("export.update", iqn=self.iqn, **values)


class Luns(Node):
    def refresh(self, e):
        sizes = {v["name"]: v["size"] for v in e.get("volumes", [])}
        self.sync({f"lun{n}": (Lun, {"lun": n, "volume": v, "size": sizes.get(v)})
                   for n, v in e["luns"].items()})

    def summary(self):
        return plural(len(self.data['luns']), "LUN"), None

    def ui_command_create(self, volume, lun=None):
        '''
        Exports volume as a LUN of this target; without lun, the lowest
        free LUN number.

        Example: create volume=db1 lun=0
        '''
        e = self.call("export.lun.add", iqn=self.data["iqn"], volume=volume, lun=lun)
        n = next(k for k, v in e["luns"].items() if v == volume)
        self.say(f"Created LUN {n} -> {volume}.")

    def ui_complete_create(self, parameters, text, current_param):
        if current_param == "volume":
            return [v["name"] for v in self.data.get("volumes", [])
                    if not v.get("exported_by") and v["name"].startswith(text)]
        return []

    def ui_command_delete(self, lun):
        '''
        Removes a LUN (lun0 or 0); the volume stays.
        '''
        self.call("export.lun.delete", iqn=self.data["iqn"], lun=lun)
        self.say(f"Deleted LUN {str(lun).removeprefix('lun')}.")

    def ui_complete_delete(self, parameters, text, current_param):
        return [c.name for c in self.children if c.name.startswith(text)]


class Lun(Node):
    def summary(self):
        d = self.data
        size = f" ({human(d['size'])})" if d.get("size") is not None else ""
        return f"{d['volume']}{size}", True


class Acls(Node):
    def refresh(self, e):
        self.sync({a: (Acl, a) for a in e.get("acl") or []})

    def summary(self):
        acl = self.data.get("acl") or []
        return (plural(len(acl), "initiator") if acl else "any initiator may log in"), None

    def ui_command_create(self, wwn):
        '''
        Allows the initiator wwn (its iSCSI name) to log in. While the list
        is empty, any initiator may.
        '''
        self.call("export.acl.add", iqn=self.data["iqn"], initiator=wwn)
        self.say(f"Created ACL for {wwn}.")

    def ui_command_delete(self, wwn):
        '''
        Removes an initiator from the ACL.
        '''
        r = self.call("export.acl.delete", iqn=self.data["iqn"], initiator=wwn)
        self.say(f"Deleted ACL for {wwn}." + (f" Note: {r['note']}." if r.get("note") else ""))

    def ui_complete_delete(self, parameters, text, current_param):
        return [c.name for c in self.children if c.name.startswith(text)]


class Acl(Node):
    def summary(self):
        return "may log in", True


class Portals(Node):
    def refresh(self, e):
        self.sync({p: (Portal, p) for p in e.get("portals", [])})

    def summary(self):
        return plural(len(self.data.get('portals', [])), "portal"), None


class Portal(Node):
    def summary(self):
        return "listening", True


class Sessions(Node):
    """The initiators logged in to this target now (read-only)."""

    def refresh(self, e):
        by_name: dict[str, list[str]] = {}
        for sess in e.get("sessions") or []:
            by_name.setdefault(sess["initiator"], []).append(sess.get("peer") or "?")
        self.sync({ini: (LoggedIn, peers) for ini, peers in by_name.items()})

    def summary(self):
        n = len(self.data.get("sessions") or [])
        return (plural(n, "session") + " logged in") if n else "none logged in", None


class LoggedIn(Node):
    def summary(self):
        return "logged in from " + ", ".join(self.data), True
