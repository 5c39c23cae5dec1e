"""Start a cloud_server as a child process and wait until it listens (demo, bench, tests)."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from common import ready_line


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so a killed bench or test
    never leaves a server (and its gigabytes) behind."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: rely on stop()
        pass


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    address: str

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(args: list[str], log_path: Path | None = None, timeout: float = 900.0,
          env: dict[str, str] | None = None) -> ServerProcess:
    """Run `python -m cloud_server --port 0 ... args`; return once it prints its ready line."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
    cmd = [sys.executable, "-m", "cloud_server", "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, **(env or {})},
                            # The kernel signals when the forking *thread* ends, so only the main thread asks.
                            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread()
                            else None)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=timeout)
            if line is None:
                raise RuntimeError(f"cloud_server exited with {proc.wait()} before it was ready"
                                   + (f"; see {log_path}" if log_path else ""))
            address = ready_line.parse(line)
            if address is not None:
                return ServerProcess(proc, address)
    except queue.Empty:
        proc.kill()
        raise RuntimeError(f"cloud_server was not ready within {timeout:.0f} s") from None
