"""Processes that stand for machines: each gets a host name of its own (a UTS namespace, `unshare --uts`, where this
user may make one: root here and in CI) and shares nothing with the others but what the test hands it."""

from __future__ import annotations

import functools
import shutil
import subprocess


@functools.cache
def can_name_hosts() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--uts", "hostname", "probe"], capture_output=True).returncode == 0


def on_machine(name: str, command: list[str]) -> list[str]:
    """`command` run under the host name `name` (unchanged where host names cannot be set: see can_name_hosts)."""
    if not can_name_hosts():
        return command
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name, *command]
