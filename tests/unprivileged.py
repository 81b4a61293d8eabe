"""Run a check as a user who cannot write other users' files, also where the tests run as root (CI does).

Root ignores file permissions, so a test of a read-only file would always pass or always skip there. As root,
`as_unprivileged` forks and the child drops to a throwaway uid and gid (no groups) before running the check;
the child has the parent's interpreter and modules already loaded, so it needs no access to the Python
installation (often under /root, which that uid cannot enter), only to the files the check opens. Those must
lie in a folder that uid can reach: `reachable_tmpdir`, not pytest's tmp_path (its root is private to root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

THROWAWAY_ID = 65534  # "nobody" on most systems; it owns none of the files a test makes


@contextlib.contextmanager
def reachable_tmpdir():
    """A fresh folder under the system temp dir that every user can enter and list (mode 755)."""
    path = Path(tempfile.mkdtemp(prefix="layershap-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            with contextlib.suppress(OSError):
                folder.chmod(0o755)
        shutil.rmtree(path, ignore_errors=True)


def as_unprivileged(check: Callable[[], str]) -> str:
    """`check()`'s result, run as a user without root's rights: in this process when it is not root, else in
    a forked child with uid and gid THROWAWAY_ID. An exception in the child comes back as its traceback,
    prefixed "raised: ". Skips where root cannot change its uid (no CAP_SETUID in this container)."""
    if os.geteuid() != 0:
        return check()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, run the check, report through the pipe, never return to pytest
        code = 0
        try:
            os.close(read)
            try:
                os.setgroups([])
                os.setgid(THROWAWAY_ID)
                os.setuid(THROWAWAY_ID)
            except PermissionError as exc:
                result, code = f"cannot drop root: {exc}", 3
            else:
                try:
                    result = check()
                except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
                    result = "raised: " + traceback.format_exc()
            os.write(write, result.encode())
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        result = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) == 3:
        pytest.skip(f"running as root and {result}")
    return result
