"""The README's blocks work as written: each carries a comment saying what this test does with it.

`<!-- test: SPEC -->` right before a fenced block (output examples, fenced
`text`, need none):

- `run`: runs the block with bash; it must exit 0.
- `SCENARIO background`: starts it (a server), waits until it serves, and
  stops it with Ctrl-C (SIGINT) once the scenario's other blocks are done;
  `SCENARIO background, exits 0`: it ends by itself, with 0, once the others
  stopped.
- `SCENARIO`: runs it while the scenario's servers run; it must exit 0, and a
  request to `/v1/responses` must complete.
- `SCENARIO python`: the same, with the venv's Python.
- `SCENARIO after`: runs it once the scenario's servers have stopped.
- `check-accounts`, `check-codex-config`: parses the accounts file or the
  Codex CLI configuration and checks it.
- `skip: REASON`: nothing; it needs a real account or Codex CLI, or it is the
  test suite itself.

Blocks run in a scratch directory whose `.venv`, `addon`, `flows`, `scripts`
are the checkout's. Two things differ from typing them, both mechanical:
`make run …` and `make demo` become the command their Makefile target runs
(checked against the Makefile), and every port the README names is mapped to
a free one, so a developer's own `make run` on 8080 is never in the way.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from responses_ws_bridge.core.accounts import parse_accounts
from responses_ws_bridge.local.ports import free_port

from tests.support.data import ROOT

README = ROOT / "README.md"
BOUND = 60.0
PYTHON = Path(sys.executable)
BANNER_END = "Ctrl-C stops everything."
# The ports the README names; the ones that must stay consecutive are mapped so.
PORTS = (8080, 8081, 9464, 8180, 8181, 9000, 8090)
MARKER = re.compile(r"^<!-- test: (?P<spec>.*?) -->$")
MAKE_RUN = re.compile(r"\bmake run(?: ARGS='(?P<args>[^']*)'| ARGS=(?P<bare>\S+))?")


@dataclass(frozen=True)
class Block:
    line: int
    spec: str
    lang: str
    body: str

    @property
    def scenario(self) -> str:
        return self.spec.split()[0].rstrip(",")

    @property
    def role(self) -> str:
        words = self.spec.replace(",", " ").split()
        for role in ("background", "python", "after"):
            if role in words[1:]:
                return role
        return "client"

    @property
    def exits(self) -> bool:
        return "exits 0" in self.spec


def blocks() -> list[Block]:
    """Every fenced block of the README with the comment before it."""
    lines = README.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    number = 0
    while number < len(lines):
        line = lines[number]
        if line.startswith("```"):
            lang = line[3:].strip()
            end = lines.index("```", number + 1)
            previous = lines[number - 1] if number else ""
            marker = MARKER.match(previous)
            if lang != "text":
                assert marker, f"README line {number + 1}: a ```{lang} block without a test comment"
            if marker:
                body = "\n".join(lines[number + 1 : end])
                found.append(Block(number + 1, marker["spec"], lang, body))
            number = end
        number += 1
    return found


def scenario_names() -> list[str]:
    special = {"run", "skip:", "check-accounts", "check-codex-config"}
    return sorted({b.scenario for b in blocks() if b.scenario not in special})


# -- turning a block into what runs ------------------------------------------------


def consecutive_free(count: int) -> int:
    for _ in range(50):
        port = free_port()
        if all(_free(port + i) for i in range(1, count)):
            return port
    raise AssertionError("no consecutive free ports")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def port_map() -> dict[int, int]:
    proxy, web = consecutive_free(2), consecutive_free(2)
    mapped = {8080: proxy, 8081: proxy + 1, 8180: web, 8181: web + 1}
    mapped |= {9464: free_port(), 9000: free_port(), 8090: free_port()}
    return mapped


def makefile_recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{target}: .*\n\t(.+)$", text, re.M)
    assert match, f"no `{target}` target in the Makefile"
    return match[1]


def translate(body: str, ports: dict[int, int]) -> str:
    """`make run`/`make demo` as their Makefile recipes, the README's ports as free ones."""
    assert makefile_recipe("run") == "$(BIN)/python scripts/run_local.py $(ARGS)"
    assert makefile_recipe("demo") == "$(BIN)/python scripts/demo.py"

    def run_local(match: re.Match[str]) -> str:
        args = shlex.split(match["args"] or match["bare"] or "")
        defaults = {
            "--port": 8080,
            "--metrics-port": 9464,
            "--web-port": 8180,
        }
        extra = [f"{flag} {port}" for flag, port in defaults.items() if flag not in args]
        command = [f"{PYTHON} scripts/run_local.py", *map(shlex.quote, args), *extra]
        return " ".join(command) + f" --upstream-port {free_port()}"

    body = MAKE_RUN.sub(run_local, body)
    body = re.sub(r"\bmake demo\b", f"{PYTHON} scripts/demo.py", body)
    return re.sub(r"\b(\d{4})\b", lambda m: str(ports.get(int(m[1]), m[1])), body)


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    for name in (".venv", "addon", "flows", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    return tmp_path


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    # mitmweb opens a browser: here, a command that does nothing.
    return {**env, "BROWSER": "true", "PYTHONUNBUFFERED": "1"}


# -- running ----------------------------------------------------------------------


@dataclass
class Server:
    block: Block
    proc: subprocess.Popen[bytes]
    log: Path
    ports: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited early:\n{self.output()}"
            if self._ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"not ready in {BOUND} s:\n{self.output()}")

    def _ready(self) -> bool:
        if "run_local.py" in self.block.body or "make run" in self.block.body:
            return BANNER_END in self.output()
        return all(not _free(port) for port in self.ports)

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(BOUND)

    def kill(self) -> None:
        """Stops it after a failure: Ctrl-C first, so that `make run` stops its own children."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(BOUND)


def start(block: Block, body: str, cwd: Path, ports: dict[int, int]) -> Server:
    log = cwd / f"server-{block.line}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", body],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=environment(),
            start_new_session=True,
        )
    named = [ports[p] for p in PORTS if re.search(rf"\b{p}\b", block.body)]
    return Server(block, proc, log, named)


def run(block: Block, body: str, cwd: Path) -> str:
    if block.role == "python":
        cmd = [str(PYTHON), "-c", body]
    else:
        cmd = ["bash", "-c", f"set -eo pipefail\n{body}"]
    done = subprocess.run(
        cmd, cwd=cwd, capture_output=True, timeout=BOUND, env=environment(), check=False
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"README line {block.line} exited {done.returncode}:\n{output}"
    if "/v1/responses" in block.body and block.scenario != "replay-recipe":
        assert "response.completed" in output, f"README line {block.line}:\n{output}"
    return output


@pytest.mark.parametrize("name", scenario_names())
def test_a_readme_scenario_works_as_written(name: str, scratch: Path) -> None:
    ports = port_map()
    ours = [b for b in blocks() if b.scenario == name]
    servers: list[Server] = []
    try:
        for block in (b for b in ours if b.role == "background"):
            server = start(block, translate(block.body, ports), scratch, ports)
            servers.append(server)
            server.wait_ready()
        for block in (b for b in ours if b.role in ("client", "python")):
            run(block, translate(block.body, ports), scratch)
        for server in reversed([s for s in servers if not s.block.exits]):
            server.interrupt()
        for server in (s for s in servers if s.block.exits):
            server.proc.wait(BOUND)
            assert server.proc.returncode == 0, server.output()
        for block in (b for b in ours if b.role == "after"):
            assert "session.mitm" not in block.body or (scratch / "session.mitm").exists()
            run(block, translate(block.body, ports), scratch)
    finally:
        for server in servers:
            server.kill()
    for server in servers:
        output = server.output()
        assert "Traceback" not in output, output
        assert not re.search(r"\] (warning|error): ", output), output


@pytest.mark.parametrize("block", [b for b in blocks() if b.spec == "run"], ids=lambda b: b.body)
def test_a_readme_command_works_as_written(block: Block, scratch: Path) -> None:
    run(block, translate(block.body, port_map()), scratch)


def test_the_accounts_file_parses() -> None:
    (block,) = [b for b in blocks() if b.spec == "check-accounts"]
    config = parse_accounts(block.body)
    assert [a.id for a in config.accounts] == ["team-a", "team-b"]
    assert config.client_keys


def test_the_codex_cli_configurations_route_through_the_bridge() -> None:
    configs = [tomllib.loads(b.body) for b in blocks() if b.spec == "check-codex-config"]
    assert sorted(c["model_providers"]["bridge"]["supports_websockets"] for c in configs) == [
        False,
        True,
    ]
    for config in configs:
        # Without model_provider naming the table, Codex CLI keeps its own provider.
        provider = config["model_providers"][config["model_provider"]]
        assert provider["base_url"].startswith("http://127.0.0.1:8080/")
        assert provider["wire_api"] == "responses"
        assert provider["env_key"]


def test_every_block_says_what_the_test_does_with_it() -> None:
    found = blocks()
    assert len(found) >= 20
    known = {"run", "check-accounts", "check-codex-config"}
    for block in found:
        assert block.spec.startswith("skip: ") or block.spec in known or block.scenario, block
    assert {b.scenario for b in found} >= {"make-run", "replay-recipe", "recording", "scaleout"}


def test_links_point_somewhere() -> None:
    text = README.read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), target
        elif anchor:
            assert anchor in anchors, target


def test_the_replay_recipe_names_a_fixture() -> None:
    recipe = " ".join(b.body for b in blocks() if b.scenario == "replay-recipe")
    fixtures = set(re.findall(r"flows/([\w-]+\.mitm)", recipe))
    assert len(fixtures) == 1
    assert fixtures <= set((ROOT / "flows" / "fixtures.json").read_text().split('"'))
