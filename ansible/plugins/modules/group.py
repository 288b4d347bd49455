#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liverestore contributors
# Apache License 2.0 (see the liverestore repository)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: group
short_description: Manage liverestore consistency groups (pairs fractured and restored at one instant)
version_added: "0.2.0"
description:
  - A consistency group is a name and a set of pairs (a pair belongs to at most one group).
    A group fracture or restore takes effect at one instant for every member, so the clones
    of a database spread over several LUs (data, log) are from the same moment.
  - While a pair is in a group, its own fracture, sync, restore, pause, resume and delete are
    refused; drive it through this module (or remove it from the group).
  - C(present) creates the group; with I(pairs) its members are exactly those pairs.
  - C(fractured) fractures every member at one instant. Syncs in progress are waited for
    first, since a clone is a copy only once its sync is done.
  - C(synchronized) re-syncs the fractured members and waits.
  - C(restored) restores every member from its clone at one instant, to completion. It does
    nothing when no member's source and clone differ, so a second run reports no change.
  - With I(keep_undo=true), C(restored) saves what each member's restore overwrites;
    C(aborted) then undoes every member's restore from one instant on, C(committed) keeps
    them and discards the undo images. Both do nothing when no member keeps an undo image.
  - C(absent) deletes the group; its pairs stay as they are.
options:
  name:
    description: The group's name.
    type: str
    required: true
  pairs:
    description:
      - The member pairs (clone names). When given, the group's members are made exactly
        these; when omitted, an existing group's members are left as they are.
    type: list
    elements: str
  state:
    description: The state the group (and its members) should be in.
    type: str
    choices: [present, fractured, synchronized, restored, aborted, committed, absent]
    default: present
  protected:
    description:
      - For I(state=restored). C(true) keeps host writes made during the restore out of the
        clones (the pairs end fractured); C(false) mirrors them (they end synchronized).
    type: bool
    default: true
  keep_undo:
    description:
      - For I(state=restored) (protected only). Save what each member's restore overwrites,
        so that I(state=aborted) can put it back until I(state=committed).
    type: bool
    default: false
  wait:
    description: Wait for the members' syncs, restores or aborts to finish (bounded by
      I(timeout)).
    type: bool
    default: true
  timeout:
    description: Seconds to wait for the daemon, and for the jobs when I(wait=true).
    type: int
    default: 3600
notes:
  - Supports check mode (nothing is changed) and diff mode (members and states).
extends_documentation_fragment:
  - liverestore.storage.daemon
author:
  - liverestore contributors
"""

EXAMPLES = r"""
- name: Group the data and log LUs of a database
  liverestore.storage.group:
    name: db1
    pairs: [db1-data-clone, db1-log-clone]

- name: Take a consistent point-in-time copy of both
  liverestore.storage.group:
    name: db1
    state: fractured

- name: Roll the whole database back to that instant while hosts keep running
  liverestore.storage.group:
    name: db1
    state: restored
    timeout: 7200
"""

RETURN = r"""
group:
  description: The group as the daemon describes it, after the change (and the wait).
  returned: when state is not absent and not in check mode
  type: dict
  sample:
    name: db1
    pairs: [db1-data-clone, db1-log-clone]
    state: fractured
    damaged: null
    members:
      - {pair: db1-data-clone, source: db1-data, clone: db1-data-clone, state: fractured,
         job: null, paused: false, extents_total: 0, extents_done: 0, error: null}
actions:
  description: The daemon operations that were (or, in check mode, would be) run.
  returned: always
  type: list
  elements: str
  sample: [group.create, group.fracture]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.liverestore.storage.plugins.module_utils.liverestore import (
    ActionRunner, common_argument_spec, find, run_runner, wait_job)


class Runner(ActionRunner):
    subject = "group"

    def do(self, op, **args):
        if self.act(op):
            self.group = self.c.call(op, name=self.p["name"], **args)

    def pairs(self):
        """The members' pair descriptions (as they are now)."""
        return [self.c.call("pair.show", pair=m) for m in self.group["pairs"]]

    def wait(self, force=False):
        if self.m.check_mode or not (self.p["wait"] or force) or self.group is None:
            return
        for m in self.group["pairs"]:
            wait_job(self.c, m, self.p["timeout"])
        self.group = self.c.call("group.show", name=self.p["name"])

    def run(self):
        p = self.p
        cur = find(self.c.call("group.list"), "name", p["name"])
        self.group = cur
        before = _view(cur)
        if p["state"] == "absent":
            if cur is not None:
                self.do("group.delete")
                self.group = None
            return dict(changed=bool(self.actions), actions=self.actions,
                        diff=dict(before=before, after={}))
        if cur is not None and cur.get("damaged"):
            self.fail("group %s: %s; delete it (state=absent) and create it again"
                      % (p["name"], cur["damaged"]))
        self.membership(cur)
        if p["state"] != "present":
            if self.m.check_mode and self.group is None:
                self.m.warn("no group %s yet: a real run would create it and then act on it"
                            % p["name"])
            elif self.group is not None:
                getattr(self, "to_" + p["state"])(self.pairs())
        after = _view(self.group) if not self.m.check_mode else self.predicted(before)
        return dict(changed=bool(self.actions), actions=self.actions, group=self.group,
                    diff=dict(before=before, after=after))

    def membership(self, cur):
        want = self.p["pairs"]
        if cur is None:
            self.do("group.create", pairs=want or [])
            return
        if want is None:
            return
        extra = [m for m in cur["pairs"] if m not in want]
        missing = [m for m in want if m not in cur["pairs"]]
        if extra:
            self.do("group.remove", pairs=extra)
        if missing:
            self.do("group.add", pairs=missing)

    def predicted(self, before):
        after = dict(before, name=self.p["name"])
        if self.p["pairs"] is not None:
            after["pairs"] = list(self.p["pairs"])
        if self.p["state"] == "fractured":
            after["state"] = "fractured"
        elif self.p["state"] == "synchronized":
            after["state"] = "synchronized"
        elif "group.restore" in self.actions:
            after["state"] = "fractured" if self.p["protected"] else "synchronized"
        elif set(self.actions) & {"group.abort", "group.commit"}:
            after["state"] = "fractured"
        return after

    # -- states -------------------------------------------------------------------------
    def to_fractured(self, pairs):
        for q in pairs:
            if q["state"] == "restoring":
                self.fail("pair %s of group %s is restoring; wait for the restore "
                          "(state=restored) first" % (q["id"], self.p["name"]))
            if q["state"] == "syncing" and q["progress"]["paused"]:
                self.fail("the sync of pair %s is paused; resume it (state=synchronized) first"
                          % q["id"])
        if any(q["state"] == "syncing" for q in pairs):
            self.wait(force=True)
        if any(q["state"] != "fractured" for q in pairs):
            self.do("group.fracture")

    def to_synchronized(self, pairs):
        for q in pairs:
            if q["state"] == "restoring":
                self.fail("pair %s of group %s is being restored; wait for the restore "
                          "(state=restored) before syncing" % (q["id"], self.p["name"]))
        if any(q["state"] == "fractured" for q in pairs):
            self.do("group.sync")
        elif any(q["progress"]["paused"] for q in pairs):
            self.do("group.resume")
        self.wait()

    def to_restored(self, pairs):
        if any(q["state"] == "restoring" for q in pairs):
            if any(q["progress"]["paused"] for q in pairs):
                self.fail("the restore of group %s is paused; resume it first" % self.p["name"])
            return self.wait()              # started earlier: follow it, no change
        if all(q["state"] == "synchronized" or q["progress"]["delta_extents"] == 0
               for q in pairs):
            return                          # sources and clones already hold the same data
        self.do("group.restore", protected=self.p["protected"], keep_undo=self.p["keep_undo"])
        self.wait()

    def to_aborted(self, pairs):
        if any(q["state"] == "aborting" for q in pairs):
            return self.wait()              # started earlier: follow it, no change
        if any(q["progress"].get("undo") for q in pairs):
            self.do("group.abort")
            self.wait()

    def to_committed(self, pairs):
        if not any(q["progress"].get("undo") for q in pairs):
            return
        if any(q["state"] == "restoring" for q in pairs):
            if any(q["progress"]["paused"] for q in pairs):
                self.fail("the restore of group %s is paused; resume it first" % self.p["name"])
            self.wait(force=True)           # only finished restores are committed
        self.do("group.commit")


def _view(g):
    if not g:
        return {}
    return dict(name=g["name"], pairs=list(g["pairs"]), state=g["state"])


def main():
    spec = common_argument_spec()
    spec.update(
        name=dict(type="str", required=True),
        pairs=dict(type="list", elements="str"),
        state=dict(type="str", default="present",
                   choices=["present", "fractured", "synchronized", "restored", "aborted",
                            "committed", "absent"]),
        protected=dict(type="bool", default=True),
        keep_undo=dict(type="bool", default=False),
        wait=dict(type="bool", default=True),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    run_runner(module, Runner, "group")


if __name__ == "__main__":
    main()
