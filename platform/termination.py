"""Why a training process ended, told to whoever runs it: the pod's termination message.

Kubernetes copies the file named by a container's `terminationMessagePath` into the pod's status, so
the operator learns why an attempt failed without exec'ing into pods or scraping logs: a user error
(bad config, bad data, unwritable checkpoint URI; never worth a restart) or any other failure.
"""

from __future__ import annotations

import os
import sys

ENV = "WAM_TERMINATION_LOG"  # set in pods to the container's terminationMessagePath
INVALID_INPUT = "InvalidInput"
ERROR = "Error"
_LIMIT = 4000  # the kubelet keeps at most 4096 bytes


def record(reason: str, message: str) -> None:
    """Write `<reason>: <message>` where $WAM_TERMINATION_LOG says (nowhere when unset, e.g. locally).

    The local ranks of a pod share the file. When one rank stops on invalid input the others then fail
    with connection errors; those consequences must not hide the cause, so an Error never replaces
    what another rank already wrote."""
    path = os.environ.get(ENV)
    if not path:
        return
    text = f"{reason}: {message}"
    try:
        if reason != INVALID_INPUT and os.path.exists(path) and os.path.getsize(path) > 0:
            return
        with open(path, "w") as f:
            f.write(text[:_LIMIT])
    except OSError:
        pass  # reporting why we failed must not hide the failure itself


def parse(text: str | None) -> tuple[str, str] | None:
    """(reason, message) of a termination message written by `record`, else None."""
    if not text:
        return None
    reason, sep, message = text.partition(": ")
    if not sep or reason not in (INVALID_INPUT, ERROR):
        return None
    return reason, message.strip()


def announce(reason: str, message: str) -> None:
    """`record`, and the same words as the process's last line of output: where only a job's log tail reaches
    the operator (a KubeRay RayJob's status message), that line says why it failed."""
    record(reason, message)
    print(f"{reason}: {message}", file=sys.stderr, flush=True)


def from_log_tail(text: str | None) -> tuple[str, str] | None:
    """(reason, message) of the last `announce` in a log tail, else None."""
    lines = (text or "").splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith((f"{INVALID_INPUT}: ", f"{ERROR}: ")):
            return parse("\n".join(lines[i:]))
    return None
