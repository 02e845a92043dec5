"""Start-up mistakes are one line that says what to do, and mitmdump exits 1: no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from responses_ws_bridge.local.ports import free_port

from tests.support.data import BRIDGE_SCRIPT, ROOT

MITMDUMP = Path(sys.executable).parent / "mitmdump"
BOUND = 30


def start(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    cmd = [str(MITMDUMP), "-s", str(BRIDGE_SCRIPT), "--listen-host", "127.0.0.1"]
    if "--listen-port" not in args:
        cmd += ["--listen-port", str(free_port())]
    done = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=BOUND,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    return done.returncode, (done.stdout + done.stderr).splitlines()


@contextmanager
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def the_error(lines: list[str], wanted: str) -> str:
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    found = [line for line in lines if wanted in line]
    assert len(found) == 1, "\n".join(lines)
    return found[0]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ('{"accounts": [{"id": "a"}]}', "accounts[0]"),
    ],
)
def test_a_bad_accounts_file(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "accounts.json"
    if content is not None:
        path.write_text(content)
    code, lines = start("--set", f"bridge_accounts={path}")
    line = the_error(lines, "bridge_accounts:")
    assert says in line and "names a JSON accounts file" in line
    assert code == 1


def test_a_metrics_port_that_is_taken() -> None:
    with taken_port() as port:
        code, lines = start("--set", f"bridge_metrics=127.0.0.1:{port}")
    line = the_error(lines, "bridge_metrics:")
    assert f"cannot listen on 127.0.0.1:{port}" in line and "give another host:port" in line
    assert code == 1


def test_a_listen_port_that_is_taken() -> None:
    """mitmproxy's own refusal, which says what to do in its own words."""
    with taken_port() as port:
        code, lines = start("--listen-port", str(port))
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert any(f"failed to listen on 127.0.0.1:{port}" in line for line in lines)
    assert code == 1


@pytest.mark.parametrize(
    ("option", "module", "extra"),
    [
        ("bridge_metrics=127.0.0.1:0", "prometheus_client", "metrics"),
        ("bridge_state=redis://127.0.0.1:1", "redis", "redis"),
    ],
)
def test_a_missing_extra_when_its_option_is_set(
    tmp_path: Path, option: str, module: str, extra: str
) -> None:
    # A module of that name that cannot be imported, as when the extra is not installed.
    shim = tmp_path / module
    shim.mkdir()
    (shim / "__init__.py").write_text(f"raise ImportError('no {module}', name={module!r})\n")
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    code, lines = start("--set", option, env=env)
    line = the_error(lines, f"pip install '.[{extra}]'")
    assert "is not installed" in line
    assert code == 1


def test_make_run_on_a_port_that_is_taken() -> None:
    with taken_port() as port:
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "run_local.py"), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=BOUND,
            cwd=ROOT,
        )
    assert done.returncode == 1
    assert done.stdout.strip().splitlines() == [
        f"127.0.0.1:{port} is already in use; try: make run ARGS='--port 8090'"
    ]
