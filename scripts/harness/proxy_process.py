"""A `mitmdump` (or `mitmweb`) child process running the bridge.

Used by `make demo`, the benchmark and the end-to-end tests: started with a
fresh confdir, bound to 127.0.0.1 on a free port, ready once the addon says so,
and always stopped (SIGINT, then kill) within a bounded time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from responses_ws_bridge.local.ports import free_port

# The mitmproxy entry script of the checkout (this package is in scripts/).
SCRIPT = Path(__file__).resolve().parents[2] / "addon" / "bridge.py"
READY_LINE = "Responses bridge ready"


def tool(name: str) -> str:
    """A console script of this environment (mitmdump, mitmweb)."""
    return str(Path(sys.executable).with_name(name))


class ProxyProcess:
    def __init__(
        self,
        *args: str,
        program: str = "mitmdump",
        start_timeout: float = 30.0,
        script: Path | None = SCRIPT,
        extra_ready: str | None = None,
        preconnect: int = 0,
    ) -> None:
        self.port = free_port()
        self.args = list(args)
        self.program = program
        self.start_timeout = start_timeout
        self.script = script
        self.extra_ready = extra_ready
        # Off unless asked for: most tests count the upstream connections a request makes.
        self.preconnect = preconnect
        self._dir = tempfile.TemporaryDirectory(prefix="bridge-proxy-")
        self.log_path = Path(self._dir.name) / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def confdir(self) -> str:
        """mitmproxy's configuration folder: its CA is `mitmproxy-ca-cert.pem` there."""
        return self._dir.name

    def start(self) -> Self:
        cmd = [
            tool(self.program),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self._dir.name}",
            "--set",
            "termlog_verbosity=info",
        ]
        if self.script is not None:
            cmd += ["-s", str(self.script)]
            # mitmproxy stalls on an option of a script given twice: only when not in args.
            if not any(a.startswith("bridge_preconnect=") for a in self.args):
                cmd += ["--set", f"bridge_preconnect={self.preconnect}"]
        cmd += self.args
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + self.start_timeout
        wanted = [READY_LINE] if self.script is not None else []
        if self.extra_ready:
            wanted.append(self.extra_ready)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.program} exited early:\n{self.log()}")
            log_text = self.log()
            if all(w in log_text for w in wanted) and _accepts(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.program} did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout)
            code = proc.returncode
        return code

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
