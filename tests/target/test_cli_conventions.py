"""The CLI's conventions as a user meets them: --version, --socket anywhere
and LIVERESTORE_SOCKET, help for everything, bash completion, a hint for a
pair named by its source, and sizes as the CLI prints them."""
from __future__ import annotations

import argparse
import os
import subprocess

from target.cli import build_parser
from tests.support import LR, ROOT


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LR, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_version_and_the_socket_before_after_or_from_the_environment(daemon):
    r = run("--version")
    assert r.returncode == 0 and r.stdout.startswith("liverestore 0."), r.stdout + r.stderr
    assert run("status", "--socket", daemon.sock).returncode == 0            # after
    assert run("pair", "list", "--socket", daemon.sock).returncode == 0
    assert run("status", env={"LIVERESTORE_SOCKET": daemon.sock}).returncode == 0
    bad = run("--socket", "/nonexistent/x.sock", "status", "--socket", daemon.sock)
    assert bad.returncode == 0, bad.stderr                # the one nearest the command wins
    assert "LIVERESTORE_SOCKET" in " ".join(run("--help").stdout.split())
    assert "LIVERESTORE_SOCKET" in run("status", "--help").stdout


def _walk(parser: argparse.ArgumentParser, path: list[str]):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                yield path + [name], "command", helps.get(name)
                yield from _walk(child, path + [name])
        else:
            yield path, action.option_strings or action.dest, action.help


def test_every_command_and_option_has_help():
    missing = [(" ".join(p), what) for p, what, h in _walk(build_parser(), [])
               if not h or h == argparse.SUPPRESS]
    assert missing == []


def test_bash_completion_completes_commands_and_options(tmp_path):
    out = tmp_path / "completions"

    def complete(line: str) -> set[str]:
        r = subprocess.run([*LR], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           env={**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line,
                                "COMP_POINT": str(len(line)), "_ARGCOMPLETE_IFS": "\n",
                                "_ARGCOMPLETE_STDOUT_FILENAME": str(out)})
        assert r.returncode == 0, r.stderr
        return set(out.read_text().split())

    assert {"restore", "resume"} <= complete("liverestore pair re")
    assert "--unprotected" in complete("liverestore pair restore --un")
    assert "--socket" in complete("liverestore status --so")


def test_a_pair_named_by_its_source_gets_a_hint(daemon):
    daemon.cli("volume", "create", "db1", "--size", "1M")
    daemon.cli("volume", "create", "db1-clone", "--size", "1M")
    daemon.cli("pair", "create", "db1", "db1-clone", "--no-sync")
    r = daemon.cli("pair", "show", "db1", ok=False)
    assert r.returncode == 1 and r.stderr.strip() == (
        "liverestore: no pair 'db1' (a pair is named by its clone); pairs of db1: db1-clone")


def test_sizes_as_the_cli_prints_them(daemon):
    daemon.cli("volume", "create", "a", "--size", "1.5M")
    shown = next(line.split(None, 1)[1] for line in
                 daemon.cli("volume", "show", "a").stdout.splitlines() if line.startswith("size"))
    assert shown == "1.5 MiB (1572864 bytes)"
    daemon.cli("volume", "create", "b", "--size", "1.5 MiB")         # what show printed
    daemon.cli("volume", "resize", "b", "2.25M")
    r = daemon.cli("volume", "create", "c", "--size", "1.5", ok=False)
    assert r.stderr.strip() == "liverestore: size '1.5' is not a whole number of bytes"
