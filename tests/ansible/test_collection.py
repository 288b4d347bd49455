"""The liverestore.storage Ansible collection against a real daemon:
the example playbook twice (second run changed=0), check mode, the
`restored` state, parameter validation, ansible-doc, secrets kept out of
the output, and the install role into a temporary prefix."""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from target.control import Client
from tests.support import ROOT, Daemon
from tests.target.iscsi.initiator import Initiator

BIN = os.path.dirname(sys.executable)
PLAYBOOK = shutil.which("ansible-playbook", path=BIN + os.pathsep + os.environ.get("PATH", ""))
pytestmark = pytest.mark.skipif(
    PLAYBOOK is None, reason="ansible-playbook not installed (ansible-core is in the test extras)")

COLLECTION = os.path.join(ROOT, "ansible")
SITE = os.path.join(COLLECTION, "examples", "site.yml")
SECRET = "example-secret-123"      # the example playbook's
IQN = "iqn.2026-11.io.liverestore.example:db"


def tool(name: str) -> str:
    return os.path.join(os.path.dirname(PLAYBOOK), name)


def interpreter() -> str:
    """A Python that cannot import liverestore if there is one: the modules
    must work with the standard library alone."""
    for py in ("/usr/bin/python3", sys.executable):
        if os.path.exists(py) and subprocess.run(
                [py, "-c", "import target.control"], cwd="/", capture_output=True).returncode:
            return py
    return sys.executable


@pytest.fixture
def env(tmp_path):
    coll = tmp_path / "collections" / "ansible_collections" / "liverestore"
    coll.mkdir(parents=True)
    os.symlink(COLLECTION, coll / "storage")
    e = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tmp_path / "collections"),
             ANSIBLE_HOME=str(tmp_path / "ansible-home"),
             ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
             ANSIBLE_PYTHON_INTERPRETER=interpreter(), ANSIBLE_NOCOLOR="1",
             ANSIBLE_FORCE_COLOR="0", ANSIBLE_RETRY_FILES_ENABLED="0",
             ANSIBLE_STDOUT_CALLBACK="default")
    e.pop("PYTHONPATH", None)
    return e


def playbook(env, path, *extra: str, ok: bool = True) -> tuple[subprocess.CompletedProcess, dict]:
    r = subprocess.run([PLAYBOOK, "-i", "localhost,", path, *extra], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+"
                  r"failed=(\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    recap = dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups())))
    return r, recap


def adhoc(env, module: str, args: dict, *extra: str) -> tuple[int, dict]:
    r = subprocess.run([tool("ansible"), "localhost", "-i", "localhost,", "-c", "local",
                        "-m", f"liverestore.storage.{module}", "-a", json.dumps(args), *extra],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    m = re.search(r"=> (\{.*\})\s*$", r.stdout, re.S)
    assert m, r.stdout + r.stderr
    return r.returncode, json.loads(m.group(1))


def test_example_site_twice_second_run_unchanged(env, daemon):
    sock = ["-e", f"liverestore_socket={daemon.sock}"]
    r, recap = playbook(env, SITE, *sock, "--diff", "-vvv")
    assert recap["failed"] == 0 and recap["changed"] == 3, r.stdout
    assert SECRET not in r.stdout + r.stderr
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in r.stdout    # the invocation was masked
    with Client(daemon.sock) as c:
        assert sorted(v["name"] for v in c.call("volume.list")) == ["db1", "db1-clone"]
        p = c.call("pair.show", pair="db1-clone")
        assert p["state"] == "fractured" and p["throttle"]["depth"] == 4
        e = c.call("export.show", iqn=IQN)
        assert e["luns"] == {"0": "db1", "1": "db1-clone"} and e["chap"]["user"] == "dbhost"
        assert e["acl"] == ["iqn.1994-05.com.example:db-host"]
        saved = c.call("saveconfig")
    assert saved["targets"][IQN]["chap"] == ["dbhost", SECRET]   # the secret did arrive
    r, recap = playbook(env, SITE, *sock, "--diff")
    assert recap == {"ok": 3, "changed": 0, "unreachable": 0, "failed": 0}, r.stdout


def test_check_mode_changes_nothing_and_predicts(env, daemon):
    r, recap = playbook(env, SITE, "-e", f"liverestore_socket={daemon.sock}", "--check", "--diff")
    assert recap["changed"] == 3 and recap["failed"] == 0, r.stdout
    assert '+    "name": "db1"' in r.stdout               # the volume's diff
    with Client(daemon.sock) as c:
        assert c.call("volume.list") == [] and c.call("export.list") == []


def test_restored_runs_a_restore_to_completion_then_is_a_no_op(env, daemon, tmp_path):
    daemon.cli("volume", "create", "db1", "--size", "4M")
    daemon.cli("volume", "create", "db1-clone", "--size", "4M")
    daemon.cli("pair", "create", "db1", "db1-clone", "--no-sync")     # every extent differs
    book = tmp_path / "restore.yml"
    book.write_text(f"""
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - liverestore.storage.pair:
        socket: {daemon.sock}
        source: db1
        clone: db1-clone
        state: restored
        protected: false
      register: out
    - ansible.builtin.debug:
        msg: "RESULT {{{{ out.pair.state }}}} {{{{ out.pair.progress.delta_extents }}}} {{{{ out.actions }}}}"
""")
    r, recap = playbook(env, str(book), "--check")
    assert recap["changed"] == 1 and "['pair.restore']" in r.stdout
    assert Client(daemon.sock).call("pair.show", pair="db1-clone")["state"] == "fractured"
    r, recap = playbook(env, str(book))
    assert recap["changed"] == 1
    # An unprotected restore ends synchronized: waited for, to the end.
    assert "RESULT synchronized 0 ['pair.restore']" in r.stdout, r.stdout
    r, recap = playbook(env, str(book))
    assert recap["changed"] == 0 and "RESULT synchronized 0 []" in r.stdout


def test_parameters_validated_with_clear_messages(env, daemon):
    sock = {"socket": daemon.sock}
    rc, out = adhoc(env, "volume", {**sock, "name": "v", "size": "lots"})
    assert rc != 0 and out["msg"].startswith("bad size 'lots'")
    rc, out = adhoc(env, "pair", {**sock, "source": "a"})
    assert rc != 0 and "missing required arguments: clone" in out["msg"]
    rc, out = adhoc(env, "pair", {**sock, "source": "a", "clone": "b", "state": "restord"})
    assert rc != 0 and "value of state must be one of" in out["msg"]
    rc, out = adhoc(env, "pair", {**sock, "source": "a", "clone": "b", "throttle": {"speed": 1}})
    assert rc != 0 and "speed" in out["msg"]
    rc, out = adhoc(env, "pair", {**sock, "source": "a", "clone": "b", "state": "restored"})
    assert rc != 0 and out["msg"] == "no pair a/b to restore from; create it first (state=synchronized)"
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "luns": {"zero": "v"}})
    assert rc != 0 and "luns: keys are LUN numbers" in out["msg"]
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "chap_secret": "x" * 12})
    assert rc != 0 and "chap_user" in out["msg"]
    rc, out = adhoc(env, "volume", {"socket": daemon.sock + ".none", "name": "v", "size": "1M"})
    assert rc != 0 and "no liverestore daemon listening" in out["msg"]
    # A size that differs from the existing volume's: refused, not ignored.
    assert adhoc(env, "volume", {**sock, "name": "v", "size": "1M"})[0] == 0
    rc, out = adhoc(env, "volume", {**sock, "name": "v", "size": "2M"})
    assert rc != 0 and "does not resize" in out["msg"]
    rc, out = adhoc(env, "volume", {**sock, "name": "v", "size": "1M"})
    assert rc == 0 and out["changed"] is False
    # Extent size: checked only when given.
    daemon.cli("volume", "create", "big", "--size", "1M", "--extent-size", "128K")
    rc, out = adhoc(env, "volume", {**sock, "name": "big"})
    assert rc == 0 and out["changed"] is False and out["volume"]["extent_size"] == 128 << 10
    rc, out = adhoc(env, "volume", {**sock, "name": "big", "extent_size": "64K"})
    assert rc != 0 and "has extent size 131072, not 65536" in out["msg"]
    # The daemon's own refusals come through as the task's message.
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "chap_user": "u", "chap_secret": "short"})
    assert rc != 0 and out["msg"].startswith("CHAP secrets must be 12")
    assert "short" not in json.dumps(out) or out.get("invocation") is None


def test_volume_module_adopts_as_is_and_grows_only_when_asked(env, daemon, tmp_path):
    sock = {"socket": daemon.sock}
    img = tmp_path / "existing.img"
    img.write_bytes(b"\x42" * (2 << 20))
    rc, out = adhoc(env, "volume", {**sock, "name": "a", "path": str(img), "size": "1M"})
    assert rc != 0 and "adopted as it is" in out["msg"]
    assert img.read_bytes() == b"\x42" * (2 << 20)          # never truncated
    rc, out = adhoc(env, "volume", {**sock, "name": "a", "path": str(img)})
    assert rc == 0 and out["volume"]["size"] == 2 << 20
    rc, out = adhoc(env, "volume", {**sock, "name": "a", "size": "4M"})
    assert rc != 0 and "grow=true" in out["msg"] and img.stat().st_size == 2 << 20
    rc, out = adhoc(env, "volume", {**sock, "name": "a", "size": "4M", "grow": True})
    assert rc == 0 and out["changed"] and out["volume"]["size"] == 4 << 20
    assert img.stat().st_size == 4 << 20 and img.read_bytes()[:2 << 20] == b"\x42" * (2 << 20)
    rc, out = adhoc(env, "volume", {**sock, "name": "a", "size": "1M", "grow": True})
    assert rc != 0 and img.stat().st_size == 4 << 20          # never shrinks


def test_export_secret_never_in_output_and_updates(env, daemon):
    sock = {"socket": daemon.sock}
    adhoc(env, "volume", {**sock, "name": "v", "size": "1M"})
    secret = "topsecret-abc-123"
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "luns": {"0": "v"},
                                    "chap_user": "u", "chap_secret": secret})
    assert rc == 0 and out["changed"] and out["export"]["chap"] == {"user": "u",
                                                                     "secret": "********"}
    assert secret not in json.dumps(out)
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "luns": {"0": "v"},
                                    "chap_user": "u", "chap_secret": secret})
    assert rc == 0 and out["changed"] is False
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "chap_user": "u", "chap_secret": secret,
                                    "update_secret": "always"})
    assert rc == 0 and out["changed"] is True and secret not in json.dumps(out)
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "acl": ["iqn.1994-05.com.example:h"],
                                    "luns": {}})
    assert rc == 0 and out["export"]["luns"] == {} and out["export"]["acl"] == [
        "iqn.1994-05.com.example:h"]
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "chap_user": ""})
    assert rc == 0 and out["changed"] and out["export"]["chap"] is None
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "state": "absent"})
    assert rc == 0 and out["changed"] and Client(daemon.sock).call("export.list") == []
    rc, out = adhoc(env, "export", {**sock, "iqn": IQN, "state": "absent"})
    assert rc == 0 and out["changed"] is False
    rc, out = adhoc(env, "volume", {**sock, "name": "v", "state": "absent"})
    assert rc == 0 and out["changed"] and Client(daemon.sock).call("volume.list") == []
    rc, out = adhoc(env, "volume", {**sock, "name": "v", "state": "absent"})
    assert rc == 0 and out["changed"] is False


@pytest.mark.parametrize("module", ["volume", "pair", "group", "export"])
def test_ansible_doc_renders(env, module):
    for args in (["-M", os.path.join(COLLECTION, "plugins", "modules"), module],
                 [f"liverestore.storage.{module}"]):
        r = subprocess.run([tool("ansible-doc"), *args], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "ERROR" not in r.stderr, r.stderr
        for section in ("OPTIONS", "EXAMPLES", "RETURN VALUES", "socket"):
            assert section in r.stdout, (module, section)


def _have_wheel() -> bool:
    try:
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _have_wheel(), reason="building liverestore offline (--no-build-isolation) "
                    "needs the 'wheel' package in the test venv (test extras)")
def test_role_installs_into_a_prefix_and_initialises_once(env, tmp_path):
    """The role against localhost in a temporary prefix: venv, pip install
    of a copy of the source (no network: --no-deps, the test venv's packages
    on PYTHONPATH for `liverestore init`), unit + drop-in, init once."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".venv", ".git", "tests", "*.egg-info", "build", "__pycache__", ".ci"))
    site_packages = next(p for p in sys.path if p.endswith("site-packages")
                         and p.startswith(sys.prefix))
    prefix, state, units = tmp_path / "opt", tmp_path / "state", tmp_path / "systemd"
    units.mkdir()
    (tmp_path / "modules-load.d").mkdir()
    (tmp_path / "dbus").mkdir()
    book = tmp_path / "role.yml"
    book.write_text(f"""
- hosts: localhost
  connection: local
  gather_facts: false
  roles:
    - role: liverestore.storage.liverestore
      vars:
        liverestore_source: {src}
        liverestore_prefix: {prefix}
        liverestore_python: {sys._base_executable}
        liverestore_pip_extra_args: --no-deps --no-build-isolation --no-index
        liverestore_environment: {{PYTHONPATH: "{ROOT}:{site_packages}"}}
        liverestore_install_packages: false
        liverestore_state_dir: {state}
        liverestore_socket: {tmp_path}/control.sock
        liverestore_portals: ["127.0.0.1:3261"]
        liverestore_systemd_dir: {units}
        liverestore_manage_service: false
        liverestore_lio: true
        liverestore_lio_dbroot: {tmp_path}/rtslib-fb-target
        liverestore_modules_load_dir: {tmp_path}/modules-load.d
        liverestore_dbus_policy_dir: {tmp_path}/dbus
""")
    r = subprocess.run([PLAYBOOK, "-i", "localhost,", str(book), "--syntax-check"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    r, recap = playbook(env, str(book))
    assert recap["changed"] >= 5 and recap["failed"] == 0, r.stdout
    assert os.access(prefix / ".venv" / "bin" / "liverestore", os.X_OK)
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "liverestore.db").st_mode) == 0o600
    assert (units / "liverestore.service").read_text() == open(
        os.path.join(ROOT, "target", "systemd", "liverestore.service")).read()
    dropin = (units / "liverestore.service.d" / "ansible.conf").read_text()
    assert (f"ExecStart={prefix}/.venv/bin/liverestore --socket {tmp_path}/control.sock serve "
            f"--backend lio --state-dir {state} --portal 127.0.0.1:3261") in dropin
    # liverestore_lio: the dbroot Debian's targetcli uses, modules at boot, the bus policy
    assert stat.S_IMODE(os.stat(tmp_path / "rtslib-fb-target").st_mode) == 0o700
    assert "target_core_user" in (tmp_path / "modules-load.d" / "liverestore.conf").read_text().split()
    assert (tmp_path / "dbus" / "liverestore.conf").read_text() == open(
        os.path.join(ROOT, "target", "dbus", "liverestore.conf")).read()
    r, recap = playbook(env, str(book))
    assert recap["changed"] == 0, r.stdout
    # What the role installed runs: init is idempotent through it too.
    r = subprocess.run([str(prefix / ".venv" / "bin" / "liverestore"), "init", "--state-dir",
                        str(state)], env={**env, "PYTHONPATH": f"{ROOT}:{site_packages}"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already initialised" in r.stdout, r.stderr


LINT = shutil.which("ansible-lint", path=BIN + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(LINT is None, reason="ansible-lint not installed (optional: pip install "
                    "ansible-lint)")
def test_ansible_lint_production_profile(env, tmp_path):
    """The collection (modules' docs, role, example) passes ansible-lint's
    strictest profile, checked in a copy laid out as an installed collection."""
    dest = tmp_path / "lint" / "ansible_collections" / "liverestore" / "storage"
    shutil.copytree(COLLECTION, dest, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([LINT, "--offline", "--profile", "production", "--nocolor"],
                       cwd=dest, env={**env, "ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "lint")},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pair_states_sync_fracture_absent(env, daemon):
    sock = {"socket": daemon.sock}
    for v in ("s", "c"):
        daemon.cli("volume", "create", v, "--size", "2M")
    pair = {**sock, "source": "s", "clone": "c"}
    rc, out = adhoc(env, "pair", {**pair, "state": "synchronized", "throttle": {"rate": "0"}})
    assert rc == 0 and out["changed"] and out["actions"] == ["pair.create"]
    assert out["pair"]["state"] == "synchronized"                     # waited for the sync
    rc, out = adhoc(env, "pair", {**pair, "state": "synchronized"})
    assert rc == 0 and not out["changed"] and out["actions"] == []
    rc, out = adhoc(env, "pair", {**pair, "state": "fractured"})
    assert rc == 0 and out["actions"] == ["pair.fracture"] and out["pair"]["state"] == "fractured"
    rc, out = adhoc(env, "pair", {**pair, "state": "fractured"})
    assert rc == 0 and not out["changed"]
    rc, out = adhoc(env, "pair", {**pair, "state": "synchronized",
                                  "throttle": {"depth": 8, "min_progress_pct": 20,
                                               "calibrate_ms": 0}})
    assert rc == 0 and out["actions"] == ["pair.throttle", "pair.sync"]
    assert out["pair"]["state"] == "synchronized" and out["pair"]["throttle"]["depth"] == 8
    assert out["pair"]["throttle"]["min_progress_pct"] == 20
    assert out["pair"]["throttle"]["calibrate_ms"] == 0
    rc, out = adhoc(env, "pair", {**sock, "source": "x", "clone": "c"})
    assert rc != 0 and out["msg"] == "c is the clone of s, not of x"
    rc, out = adhoc(env, "pair", {**pair, "state": "absent"})
    assert rc == 0 and out["changed"] and out["actions"] == ["pair.delete"]
    rc, out = adhoc(env, "pair", {**pair, "state": "absent"})
    assert rc == 0 and not out["changed"]
    assert Client(daemon.sock).call("pair.list") == []


@pytest.mark.parametrize("module", ["volume", "pair", "group", "export"])
def test_documentation_matches_argument_spec(module, tmp_path, monkeypatch):
    """What validate-modules checks (ansible-test sanity needs the network):
    every option documented with the argument_spec's type, default,
    choices, required and no_log, and nothing documented that is not there."""
    import importlib
    import yaml
    from ansible.module_utils import basic

    root = tmp_path / "c"
    (root / "ansible_collections" / "liverestore").mkdir(parents=True)
    os.symlink(COLLECTION, root / "ansible_collections" / "liverestore" / "storage")
    monkeypatch.syspath_prepend(str(root))
    captured = {}

    class Stop(Exception):
        pass

    def fake(self, argument_spec, **kw):
        captured.update(argument_spec)
        raise Stop

    monkeypatch.setattr(basic.AnsibleModule, "__init__", fake)
    mod = importlib.import_module(f"ansible_collections.liverestore.storage.plugins.modules.{module}")
    with pytest.raises(Stop):
        mod.main()
    doc = yaml.safe_load(mod.DOCUMENTATION)
    for frag in doc.get("extends_documentation_fragment", []):
        # as ansible-doc merges them: the module's own fields win
        ns, coll, name = frag.split(".")
        fmod = importlib.import_module(f"ansible_collections.{ns}.{coll}.plugins.doc_fragments.{name}")
        for k, v in yaml.safe_load(fmod.ModuleDocFragment.DOCUMENTATION).get("options", {}).items():
            doc["options"][k] = {**v, **doc["options"].get(k, {})}
    yaml.safe_load(mod.EXAMPLES)
    yaml.safe_load(mod.RETURN)
    assert doc["module"] == module

    def check(spec, options, where):
        assert set(spec) == set(options), where
        for name, s in spec.items():
            o = options[name]
            at = f"{where}.{name}"
            assert o.get("type", "str") == s.get("type", "str"), at
            assert o.get("default") == s.get("default"), at
            assert o.get("choices") == s.get("choices"), at
            assert bool(o.get("required")) == bool(s.get("required")), at
            assert o.get("elements") == s.get("elements"), at
            assert bool(s.get("no_log")) == (name in ("chap_secret", "mutual_secret")), at
            if "options" in s:
                check(s["options"], o["suboptions"], at)

    check(captured, doc["options"], module)


def test_restored_paused_from_elsewhere_fails_with_the_clis_outcome(env, daemon):
    """The module and `pair restore --wait` agree: a paused restore is no
    success (the CLI exits 3, the module fails with outcome=paused)."""
    daemon.cli("volume", "create", "db1", "--size", "4M")
    daemon.cli("volume", "create", "db1-clone", "--size", "4M")
    daemon.cli("pair", "create", "db1", "db1-clone", "--no-sync")
    daemon.cli("pair", "throttle", "db1-clone", "--rate", "256K", "--batch-extents", "1",
               "--depth", "1")

    def pause_once_running() -> None:
        with Client(daemon.sock) as c:
            for _ in range(400):
                if c.call("pair.show", pair="db1-clone")["progress"]["job"] == "restore":
                    c.call("pair.pause", pair="db1-clone")
                    return
                time.sleep(0.05)

    pauser = threading.Thread(target=pause_once_running)
    pauser.start()
    rc, out = adhoc(env, "pair", {"socket": daemon.sock, "source": "db1", "clone": "db1-clone",
                                  "state": "restored"})
    pauser.join()
    assert rc != 0 and out.get("outcome") == "paused", out
    assert "paused" in out["msg"]
    r = daemon.cli("pair", "wait", "db1-clone", ok=False)
    assert r.returncode == 3


def _host_writes_to(daemon, iqn: str, lun: int) -> None:
    """The example's host writes one block of db1 through iSCSI (it lands in
    the pair's delta)."""
    async def go() -> None:
        i = Initiator("127.0.0.1", daemon.port, name="iqn.1994-05.com.example:db-host")
        await i.login(iqn, chap=("dbhost", SECRET))
        try:
            for _ in range(3):                   # the power-on unit attention first
                r = await i.scsi(lun, bytes(6))
                if r.status == 0:
                    break
            assert (await i.write(lun, 0, b"h" * 512)).status == 0
        finally:
            await i.close()
    asyncio.run(go())


def test_restore_playbook_is_idempotent_per_point_in_time(env, daemon, tmp_path):
    """restore.yml (kept out of site.yml) restores once per fracture; hosts'
    writes afterwards are not rolled back by a re-run, force=true does, a new
    fracture is a new point; the daemon remembers across a restart."""
    site = open(SITE).read()
    assert "state: restored" not in site
    book = os.path.join(COLLECTION, "examples", "restore.yml")
    sock = ["-e", f"liverestore_socket={daemon.sock}"]
    playbook(env, SITE, *sock)                    # provisioned: db1-clone fractured
    _host_writes_to(daemon, IQN, 0)          # the source differs from the clone
    r, recap = playbook(env, book, *sock)
    assert recap["changed"] == 1, r.stdout
    _host_writes_to(daemon, IQN, 0)          # hosts go on after the restore
    with Client(daemon.sock) as c:
        p = c.call("pair.show", pair="db1-clone")
    assert p["progress"]["delta_extents"] == 1 and p["history"]["current_point_restored"]
    r, recap = playbook(env, book, *sock)
    assert recap["changed"] == 0, r.stdout          # not rolled back again
    r, recap = playbook(env, book, *sock, "-e", "force=true")
    assert recap["changed"] == 1, r.stdout
    # Remembered across a restart of the daemon.
    _host_writes_to(daemon, IQN, 0)
    assert daemon.stop() == 0
    again = Daemon(tmp_path, init=False)
    again.port = daemon.port
    again.start()
    try:
        r, recap = playbook(env, book, *sock)
        assert recap["changed"] == 0, r.stdout
        # A new point in time (sync, fracture) is restored again.
        again.cli("pair", "sync", "db1-clone", "--wait")
        again.cli("pair", "fracture", "db1-clone")
        _host_writes_to(again, IQN, 0)
        r, recap = playbook(env, book, *sock)
        assert recap["changed"] == 1, r.stdout
    finally:
        again.stop()


def test_group_module_is_idempotent_with_check_mode(env, daemon):
    sock = {"socket": daemon.sock}
    for lu in ("data", "log"):
        daemon.cli("volume", "create", lu, "--size", "1M")
        daemon.cli("volume", "create", lu + "-clone", "--size", "1M")
        daemon.cli("pair", "create", lu, lu + "-clone", "--wait")
    group = {**sock, "name": "db", "pairs": ["data-clone", "log-clone"]}
    rc, out = adhoc(env, "group", {**group, "state": "fractured"}, "--check")
    assert rc == 0 and out["changed"] and out["actions"] == ["group.create"]
    assert Client(daemon.sock).call("group.list") == []            # check mode changed nothing
    rc, out = adhoc(env, "group", {**group, "state": "fractured"})
    assert rc == 0 and out["actions"] == ["group.create", "group.fracture"]
    assert out["group"]["state"] == "fractured"
    rc, out = adhoc(env, "group", {**group, "state": "fractured"})
    assert rc == 0 and not out["changed"] and out["actions"] == []
    rc, out = adhoc(env, "group", {**group, "state": "restored"})   # nothing differs
    assert rc == 0 and not out["changed"]
    rc, out = adhoc(env, "group", {**sock, "name": "db", "pairs": ["data-clone"]}, "--check")
    assert rc == 0 and out["actions"] == ["group.remove"]
    assert Client(daemon.sock).call("group.show", name="db")["pairs"] == ["data-clone", "log-clone"]
    rc, out = adhoc(env, "group", {**group, "state": "synchronized"})
    assert rc == 0 and out["actions"] == ["group.sync"] and out["group"]["state"] == "synchronized"
    rc, out = adhoc(env, "group", {**sock, "name": "db", "state": "absent"})
    assert rc == 0 and out["changed"] and out["actions"] == ["group.delete"]
    rc, out = adhoc(env, "group", {**sock, "name": "db", "state": "absent"})
    assert rc == 0 and not out["changed"]
    assert Client(daemon.sock).call("group.list") == []


def test_keep_undo_restore_abort_commit_idempotent_with_check_mode(env, daemon):
    sock = {"socket": daemon.sock}
    for lu in ("data", "log"):
        daemon.cli("volume", "create", lu, "--size", "1M")
        daemon.cli("volume", "create", lu + "-clone", "--size", "1M")
        daemon.cli("pair", "create", lu, lu + "-clone", "--no-sync")   # every extent differs
    c = Client(daemon.sock)
    pair = {**sock, "source": "log", "clone": "log-clone"}
    rc, out = adhoc(env, "pair", {**pair, "state": "restored", "keep_undo": True})
    assert rc == 0 and out["actions"] == ["pair.restore"] and out["pair"]["progress"]["undo"]
    rc, out = adhoc(env, "pair", {**pair, "state": "aborted"}, "--check")
    assert rc == 0 and out["changed"] and out["actions"] == ["pair.abort"]
    assert c.call("pair.show", pair="log-clone")["progress"]["undo"]   # check mode: unchanged
    rc, out = adhoc(env, "pair", {**pair, "state": "aborted"})
    assert rc == 0 and out["actions"] == ["pair.abort"] and not out["pair"]["progress"]["undo"]
    assert out["pair"]["state"] == "fractured"
    for state in ("aborted", "committed"):      # nothing kept: nothing to do
        rc, out = adhoc(env, "pair", {**pair, "state": state})
        assert rc == 0 and not out["changed"], out

    group = {**sock, "name": "db", "pairs": ["data-clone", "log-clone"]}
    rc, out = adhoc(env, "group", {**group, "state": "restored", "keep_undo": True})
    assert rc == 0 and out["actions"] == ["group.create", "group.restore"], out
    assert all(m["undo"] for m in out["group"]["members"])
    rc, out = adhoc(env, "group", {**group, "state": "committed"}, "--check")
    assert rc == 0 and out["actions"] == ["group.commit"]
    rc, out = adhoc(env, "group", {**group, "state": "committed"})
    assert rc == 0 and out["actions"] == ["group.commit"]
    assert not any(m["undo"] for m in out["group"]["members"])
    rc, out = adhoc(env, "group", {**group, "state": "committed"})
    assert rc == 0 and not out["changed"]
    rc, out = adhoc(env, "pair", {**sock, "source": "data", "clone": "data-clone",
                                  "state": "aborted"})
    assert rc == 0 and not out["changed"]


def test_the_pair_modules_throttle_documentation_states_the_engines_ranges():
    """DOCUMENTATION is static YAML (ansible-doc reads it without running
    the module), so it restates each knob's range: held here to the one
    table the engine, the CLI and the shell use."""
    import ast
    import yaml
    from restore_core.throttle import KNOBS

    src = open(os.path.join(COLLECTION, "plugins", "modules", "pair.py")).read()
    doc = next(yaml.safe_load(n.value.value) for n in ast.parse(src).body
               if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "DOCUMENTATION")
    sub = doc["options"]["throttle"]["suboptions"]
    assert list(sub) == [k.name for k in KNOBS]
    for k in KNOBS:
        if k.hi is not None:
            assert f"({k.lo}-{k.hi}" in " ".join(sub[k.name]["description"].split()), k.name
