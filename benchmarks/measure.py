"""Run a command and sample its memory: shared by the benchmarks that report peak RSS."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import psutil


def run_measured(cmd: list[str], cwd: str | Path | None = None, interval: float = 0.2
                 ) -> tuple[subprocess.CompletedProcess, float, dict[str, float]]:
    """Run ``cmd`` to completion; return (the completed process with its stdout/stderr, wall seconds, peak RSS in
    MiB of the command itself (``driver``) and of the largest process it started (``largest_child``: Ray
    workers, raylet, ...)), sampled every ``interval`` seconds."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    peak = {"driver": 0.0, "largest_child": 0.0}
    stop = threading.Event()

    def sample() -> None:
        try:
            me = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                peak["driver"] = max(peak["driver"], me.memory_info().rss / 2**20)
                for child in me.children(recursive=True):
                    try:
                        peak["largest_child"] = max(peak["largest_child"], child.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    return done, time.perf_counter() - t0, {k: round(v, 1) for k, v in peak.items()}


def main() -> None:
    """``python benchmarks/measure.py [--json OUT] -- CMD ...``: run CMD, print one JSON line with its wall
    seconds, peak RSS (MiB) of the command and of its largest child process, CPU seconds and exit code."""
    import argparse
    import json
    import resource
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--json", help="also write the JSON object here")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    done, wall, peak = run_measured(cmd)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"cmd": cmd, "returncode": done.returncode, "wall_seconds": round(wall, 1), "peak_rss_mib": peak,
           "user_seconds": round(usage.ru_utime, 1), "system_seconds": round(usage.ru_stime, 1),
           "stdout_tail": done.stdout[-3000:], "stderr_tail": done.stderr[-3000:]}
    print(json.dumps(res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
