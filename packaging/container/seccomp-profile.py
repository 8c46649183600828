#!/usr/bin/env python3
"""Prints seccomp.json, the seccomp profile for running syncgate in a container with io_uring.

    python3 packaging/container/seccomp-profile.py > packaging/container/seccomp.json

Container runtimes' default profiles deny io_uring_setup, io_uring_enter and
io_uring_register (Docker's since 2023, Kubernetes' RuntimeDefault likewise), and syncgate
needs them. This profile allows, by name, what syncgate.service allows (systemd's
@system-service set, which holds every system call the daemon makes: see the unit's
comment), and the three io_uring calls, less what a container must not do:

- no namespaces: unshare and setns are refused, and clone only without CLONE_NEW* flags;
  clone3 fails with ENOSYS (its flags are behind a pointer, which seccomp cannot read), so
  glibc falls back to clone;
- no keyring calls (add_key, keyctl, request_key): the kernel keyring is not namespaced.

Anything else fails with EPERM. The set comes from `systemd-analyze syscall-filter` (Debian
12's systemd 252, as in CI); tests/container.rs regenerates it and fails if the committed
file differs.
"""

import json
import subprocess
import sys

# The groups and names to start from: syncgate.service's SystemCallFilter= allow list.
BASE = ["@system-service", "io_uring_setup", "io_uring_enter", "io_uring_register"]
# Never allowed by name (see above); clone and clone3 get rules of their own.
DENIED = {"unshare", "setns", "add_key", "keyctl", "request_key", "clone", "clone3"}
# CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID
# | CLONE_NEWNET: clone is allowed when none of these bits is set in its flags.
CLONE_NEW_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
ENOSYS = 38


def expand(name, seen):
    """The system calls of a group (recursively) or the name itself."""
    if not name.startswith("@"):
        return {name}
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager", name],
        check=True, capture_output=True, text=True,
    ).stdout
    calls = set()
    for line in out.splitlines()[1:]:
        line = line.strip()
        if line and not line.startswith("#"):
            calls |= expand(line, seen)
    return calls


def main():
    seen = set()
    allowed = set()
    for name in BASE:
        allowed |= expand(name, seen)
    allowed -= DENIED
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [
            {"names": sorted(allowed), "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": CLONE_NEW_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS},
        ],
    }
    json.dump(profile, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
