"""CPU time and memory growth of one call, measured in a fresh interpreter (so earlier tests' peaks don't hide it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The peak resident memory of this process image: VmHWM starts afresh at exec, where getrusage's ru_maxrss keeps
# the peak of the process that forked it (a large pytest process would hide the growth).
_MEASURE = """
import json, re, time
def peak_rss():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s*(\\d+) kB", status.read()).group(1)) * 1024
peak = peak_rss()
start = time.process_time()
try:
    {call}
    error = None
except Exception as err:
    error = [type(err).__name__, str(err)]
print(json.dumps({{"cpu_s": time.process_time() - start, "error": error,
                  "memory_growth": peak_rss() - peak}}))
"""


def measured(setup: str, call: str, **env: str) -> dict:
    """Run ``setup`` (imports, not measured), then the one-line statement ``call`` in a fresh interpreter with
    the repository on its path and ``env`` added to the environment.

    Returns:
        ``cpu_s``: CPU seconds of ``call``; ``memory_growth``: bytes by which it raised the peak resident memory;
        ``error``: ``[type name, message]`` of the exception it raised, or ``None``.
    """
    run = subprocess.run(
        [sys.executable, "-c", setup + _MEASURE.format(call=call)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])
