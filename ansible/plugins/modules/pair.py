#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liverestore contributors
# Apache License 2.0 (see the liverestore repository)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: pair
short_description: Manage liverestore source/clone pairs, syncs and restores
version_added: "0.1.0"
description:
  - Pairs a clone volume with a source volume and drives the pair to a state through the
    liverestore daemon's control socket.
  - C(synchronized) creates the pair (a full copy source to clone) or re-syncs a fractured
    pair (only the extents that differ).
  - C(fractured) splits the clone off as a point-in-time copy, syncing it first if needed.
  - C(restored) copies the clone back onto the source while hosts keep using the source,
    to completion. It does nothing when source and clone do not differ (a fractured pair
    with no extents in its delta, or a synchronized pair), and nothing once a restore from
    the clone's current point in time (when it was last fractured, which the daemon
    records) has finished, even though hosts wrote to the source since; so a second run
    reports ok. Restoring the same point in time again needs I(force=true).
  - With I(keep_undo=true), C(restored) saves what the restore overwrites to an undo image;
    C(aborted) then puts it back (except extents hosts wrote since the restore began), and
    C(committed) keeps the restore and discards the image. Both do nothing when the pair
    keeps no undo image, so a second run reports ok.
  - C(absent) removes the pairing; both volumes stay.
options:
  source:
    description: The source volume (the one hosts use).
    type: str
    required: true
  clone:
    description: The clone volume; also the pair's id.
    type: str
    required: true
  state:
    description: The state the pair should be in.
    type: str
    choices: [synchronized, fractured, restored, aborted, committed, absent]
    default: synchronized
  protected:
    description:
      - For I(state=restored). C(true) (protected restore) keeps host writes made during the
        restore out of the clone; the pair ends fractured. C(false) mirrors them to the
        clone; the pair ends synchronized.
    type: bool
    default: true
  keep_undo:
    description:
      - For I(state=restored) (protected only). Save what the restore overwrites, so that
        I(state=aborted) can put it back until I(state=committed). About halves the
        restore's speed.
    type: bool
    default: false
  undo_volume:
    description:
      - With I(keep_undo=true), the volume that holds the undo data (in no pair, at least as
        big as the source; not ready to hosts meanwhile). Default a sparse image the daemon
        makes beside the source.
    type: str
  wait:
    description:
      - Wait for the sync, restore or abort to finish (bounded by I(timeout)).
      - C(fractured) from a new or syncing pair needs the copy to finish, so it always waits.
    type: bool
    default: true
  extent_size:
    description: Extent size of a new pair (default the source volume's).
    type: str
  throttle:
    description: Background copy settings; only the given ones are managed.
    type: dict
    suboptions:
      rate:
        description: Bytes per second, e.g. C(200M); C(0) for unlimited.
        type: str
      batch_extents:
        description: Adjacent extents merged into one copy I/O (1-4096).
        type: int
      depth:
        description: Copy I/Os in flight at once (1-64).
        type: int
      host_window:
        description: Hosts count as busy while a command was seen within this many copy round
          trips; the copier then copies only to keep I(min_progress_pct) (0-10000; C(0) never
          yields).
        type: int
      min_progress_pct:
        description: While hosts are busy, copy at this percentage of the idle rate (1-100).
        type: int
      calibrate_ms:
        description: A sync or restore of 256 MiB or more first holds the LU's host I/O this
          long to measure the idle rate I(min_progress_pct) is a share of (0-1000; C(0) no hold).
        type: int
  force:
    description:
      - With I(state=absent), remove the pair even while a restore runs.
      - With I(state=restored), restore even though the source was already restored from
        the clone's current point in time (rolling back what hosts wrote since).
    type: bool
    default: false
  timeout:
    description: Seconds to wait for the daemon, and for a job when I(wait=true).
    type: int
    default: 3600
notes:
  - Supports check mode (nothing is started) and diff mode (state and throttle).
  - Keep C(restored) tasks out of playbooks that provision or run periodically (a separate
    playbook, or a task tagged C(never)); even idempotent, a restore is an operation, and a
    new fracture makes a new point in time that the next run would restore.
extends_documentation_fragment:
  - liverestore.storage.daemon
author:
  - liverestore contributors
"""

EXAMPLES = r"""
- name: Keep db1-clone as a synchronized mirror of db1
  liverestore.storage.pair:
    source: db1
    clone: db1-clone
    state: synchronized
    throttle:
      rate: 200M

- name: Split the clone off before an upgrade
  liverestore.storage.pair:
    source: db1
    clone: db1-clone
    state: fractured

# In its own playbook (or tagged never), not in the provisioning play:
- name: Roll db1 back to the clone while hosts keep running
  liverestore.storage.pair:
    source: db1
    clone: db1-clone
    state: restored
    wait: true
    timeout: 7200
  tags: [never, restore]

- name: Restore, keeping what it overwrites (undo with state=aborted)
  liverestore.storage.pair:
    source: db1
    clone: db1-clone
    state: restored
    keep_undo: true
  tags: [never, restore]

- name: The wrong day was restored; put the source back as it was
  liverestore.storage.pair:
    source: db1
    clone: db1-clone
    state: aborted
  tags: [never, abort]
"""

RETURN = r"""
pair:
  description: The pair as the daemon describes it, after the change (and the wait).
  returned: when state is not absent
  type: dict
  sample:
    id: db1-clone
    source: db1
    clone: db1-clone
    state: fractured
    size: 10737418240
    extent_size: 65536
    throttle: {rate: 0, batch_extents: 16, depth: 2, host_window: 8, min_progress_pct: 10,
               calibrate_ms: 50}
    progress: {state: fractured, job: null, extents_total: 0, extents_done: 0,
               delta_extents: 0, rate: 0.0, eta: null, error: null, paused: false,
               protected: null, bytes_copied: 0}
outcome:
  description:
    - When a followed sync or restore did not finish, how it stopped; the same words as the
      CLI's C(--wait), whose exit status stands for them (3, 4, 5, 6).
  returned: on failure of a followed job
  type: str
  choices: [paused, failed, aborted, waiting]
actions:
  description: The daemon operations that were (or, in check mode, would be) run.
  returned: always
  type: list
  elements: str
  sample: [pair.restore]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.liverestore.storage.plugins.module_utils.liverestore import (
    ActionRunner, common_argument_spec, find, parse_size, run_runner, wait_job)

KNOBS = ("rate", "batch_extents", "depth", "host_window", "min_progress_pct", "calibrate_ms")


class Runner(ActionRunner):
    subject = "pair"

    def do(self, op, **args):
        if not self.act(op):
            return None
        self.pair = self.c.call(op, **args) or self.pair
        return self.pair

    def wait(self, force=False):
        if self.m.check_mode or not (self.p["wait"] or force):
            return
        self.pair = wait_job(self.c, self.p["clone"], self.p["timeout"])


    def run(self):
        p = self.p
        cur = find(self.c.call("pair.list"), "id", p["clone"])
        self.pair = cur
        if cur is not None and cur["source"] != p["source"]:
            self.fail("%s is the clone of %s, not of %s" % (p["clone"], cur["source"], p["source"]))
        if cur is not None and p["extent_size"]:
            try:
                es = parse_size(p["extent_size"])
            except ValueError as e:
                self.fail("extent_size: %s" % e)
            if es != cur["extent_size"]:
                self.fail("pair %s has extent size %d, not %d; delete and recreate it to change"
                          " that" % (p["clone"], cur["extent_size"], es))
        before = _view(cur)
        if p["state"] == "absent":
            if cur is not None:
                self.do("pair.delete", pair=p["clone"], force=p["force"])
            return dict(changed=bool(self.actions), actions=self.actions,
                        diff=dict(before=before, after={}))
        throttle = self.throttle_changes(cur)
        wanted = dict(throttle)
        if cur is None:
            if p["state"] == "restored":
                if self.m.check_mode:       # an earlier task may be about to create it
                    self.m.warn("no pair %s/%s yet: a real run would fail here"
                                % (p["source"], p["clone"]))
                    return dict(changed=False, actions=self.actions)
                self.fail("no pair %s/%s to restore from; create it first (state=synchronized)"
                          % (p["source"], p["clone"]))
            self.do("pair.create", source=p["source"], clone=p["clone"],
                    extent_size=p["extent_size"], sync=True, **throttle)
            throttle = {}
        elif throttle:
            self.do("pair.throttle", pair=p["clone"], **throttle)
        getattr(self, "to_" + p["state"])(cur)
        after = _view(self.pair) if not self.m.check_mode else self.predicted(before, wanted)
        return dict(changed=bool(self.actions), actions=self.actions, pair=self.pair,
                    diff=dict(before=before, after=after))

    def predicted(self, before, throttle):
        """What check mode expects the pair to look like afterwards."""
        after = dict(before, source=self.p["source"], clone=self.p["clone"])
        state = self.p["state"]
        if state in ("restored", "aborted", "committed"):
            state = before.get("state")
            if "pair.restore" in self.actions:
                state = "fractured" if self.p["protected"] else "synchronized"
            if set(self.actions) & {"pair.abort", "pair.commit"}:
                state = "fractured"
        after["state"] = state
        th = dict(before.get("throttle") or {})
        th.update(throttle)
        after["throttle"] = th
        return after

    def throttle_changes(self, cur):
        want = self.p["throttle"] or {}
        out = {}
        for k in KNOBS:
            v = want.get(k)
            if v is None:
                continue
            if k == "rate":
                try:
                    v = parse_size(v)
                except ValueError as e:
                    self.fail("throttle.rate: %s" % e)
            if cur is None or cur["throttle"][k] != v:
                out[k] = v
        return out

    def job(self):
        return self.pair["progress"] if self.pair else None

    # -- states -------------------------------------------------------------------------
    def to_synchronized(self, cur):
        if cur is None:
            return self.wait()
        st = cur["state"]
        if st == "fractured":
            self.do("pair.sync", pair=self.p["clone"])
        elif st in ("restoring", "aborting"):
            self.fail("%s is being restored onto %s; wait for the restore (state=restored) "
                      "before syncing" % (self.p["clone"], self.p["source"]))
        elif cur["progress"].get("undo"):
            self.fail("%s keeps the undo image of its restore; state=committed or "
                      "state=aborted first" % self.p["clone"])
        elif cur["progress"]["paused"]:
            self.do("pair.resume", pair=self.p["clone"])
        self.wait()

    def to_fractured(self, cur):
        st = cur["state"] if cur else "syncing"
        if st == "aborting":
            self.wait(force=True)           # an abort ends fractured
            return
        if st == "restoring":
            if not cur["progress"]["protected"]:
                self.fail("%s is in an unprotected restore, which ends synchronized; "
                          "wait for it first" % self.p["clone"])
            self.wait(force=True)           # a protected restore ends fractured
            return
        if st == "fractured":
            return
        if st == "syncing":
            if cur is not None and cur["progress"]["paused"]:
                self.fail("the sync of %s is paused; resume it first" % self.p["clone"])
            self.wait(force=True)           # a clone is a copy only once the sync is done
        self.do("pair.fracture", pair=self.p["clone"])

    def to_restored(self, cur):
        st, pr = cur["state"], cur["progress"]
        if st in ("restoring", "aborting"):
            if pr["paused"]:
                self.fail("the %s of %s is paused; resume it (or pair resume) first"
                          % (pr["job"], self.p["clone"]))
            return self.wait()              # started earlier: follow it, no change
        if st == "syncing":
            self.fail("%s is syncing from %s; a restore now would copy a partial clone back"
                      % (self.p["clone"], self.p["source"]))
        if st == "synchronized" or pr["delta_extents"] == 0:
            return                          # source and clone already hold the same data
        if (cur.get("history") or {}).get("current_point_restored") and not self.p["force"]:
            return                          # done before; hosts' writes since are theirs
        self.do("pair.restore", pair=self.p["clone"], protected=self.p["protected"],
                keep_undo=self.p["keep_undo"], undo_volume=self.p["undo_volume"])
        self.wait()

    def to_aborted(self, cur):
        st, pr = cur["state"], cur["progress"]
        if st == "aborting":
            return self.wait()              # started earlier: follow it, no change
        if pr.get("undo"):
            self.do("pair.abort", pair=self.p["clone"])
            self.wait()

    def to_committed(self, cur):
        if not cur["progress"].get("undo"):
            return
        if cur["state"] == "restoring":
            if cur["progress"]["paused"]:
                self.fail("the restore of %s is paused; resume it first" % self.p["clone"])
            self.wait(force=True)           # only a finished restore is committed
        self.do("pair.commit", pair=self.p["clone"])


def _view(p):
    if not p:
        return {}
    return dict(source=p["source"], clone=p["clone"], state=p["state"],
                delta_extents=p["progress"]["delta_extents"], throttle=p["throttle"])


def main():
    spec = common_argument_spec()
    spec.update(
        source=dict(type="str", required=True),
        clone=dict(type="str", required=True),
        state=dict(type="str", default="synchronized",
                   choices=["synchronized", "fractured", "restored", "aborted", "committed",
                            "absent"]),
        protected=dict(type="bool", default=True),
        keep_undo=dict(type="bool", default=False),
        undo_volume=dict(type="str"),
        wait=dict(type="bool", default=True),
        extent_size=dict(type="str"),
        throttle=dict(type="dict", options=dict(
            rate=dict(type="str"), batch_extents=dict(type="int"), depth=dict(type="int"),
            host_window=dict(type="int"), min_progress_pct=dict(type="int"),
            calibrate_ms=dict(type="int"))),
        force=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True)
    if module.params["source"] == module.params["clone"]:
        module.fail_json(msg="source and clone must be different volumes")
    run_runner(module, Runner, "pair")


if __name__ == "__main__":
    main()
