"""What every child process postwarden forks or spawns does first: die with its parent.

A worker, listener or supervised daemon left running after its parent was killed would
hold the listening socket unsupervised, and its replacement could not bind it
(docs/ARCHITECTURE.md, "Supervision").
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send `sig` to this process when `parent` dies; False if it already has.

    Call it after any setuid/setgid (they clear the setting) and in the child, with the
    parent's pid read before forking: a parent that died before the call is caught by the
    check that follows it.
    """
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    return os.getppid() == parent
