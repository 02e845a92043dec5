"""Token chains across instances: which chain wins, the store's write rule, when to refresh,
the backoff, and what a waiting instance does. Tables, no I/O."""

from __future__ import annotations

import pytest
from harness.oauth_server import unsigned_jwt
from responses_ws_bridge.core.token_chain import (
    MAX_KNOWN,
    Adopt,
    Chain,
    FailFast,
    KeepWaiting,
    Publish,
    RefreshNow,
    TakeOver,
    UseChain,
    UseToken,
    chain_from_json,
    chain_to_json,
    choose_chain,
    file_chain,
    may_write,
    refresh_backoff,
    refresh_step,
    wait_step,
)
from responses_ws_bridge.core.token_refresh import Tokens, fingerprint

NOW = 1_800_000_000.0
LIVE = unsigned_jwt({"exp": NOW + 3600})
DUE = unsigned_jwt({"exp": NOW + 60})  # inside the 300 s margin, not expired
EXPIRED = unsigned_jwt({"exp": NOW - 1})

FILE = Tokens("file-access", "rt-0")
LOGIN = file_chain(FILE)  # generation 0
GEN1 = LOGIN.rotated(Tokens("a1", "rt-1"))
GEN2 = GEN1.rotated(Tokens("a2", "rt-2"))
# A fresh login put in a file: a new chain above the old one.
NEW_FILE = Tokens("new-access", "rt-new")
NEW_LOGIN = file_chain(NEW_FILE, generation=3, history=GEN2.known)


def test_a_chain_remembers_every_refresh_token_it_held() -> None:
    assert (GEN2.generation, GEN2.origin) == (2, fingerprint("rt-0"))
    assert all(GEN2.knows(t) for t in ("rt-0", "rt-1", "rt-2"))
    assert not GEN2.knows("rt-new")
    assert "rt-" not in repr(GEN2) and "a2" not in str(GEN2)


def test_known_tags_are_bounded() -> None:
    chain = LOGIN
    for i in range(MAX_KNOWN + 10):
        chain = chain.rotated(Tokens(f"a{i}", f"r{i}"))
    assert len(chain.known) == MAX_KNOWN
    assert chain.knows(f"r{MAX_KNOWN + 9}")


@pytest.mark.parametrize(
    ("file", "local", "stored", "expected"),
    [
        # First instance, empty store: the file's login is published.
        (FILE, None, None, Publish(LOGIN)),
        # The store is ahead (another instance refreshed): its chain, whatever the file says.
        (FILE, None, GEN2, UseChain(GEN2)),
        (FILE, GEN1, GEN2, UseChain(GEN2)),
        (FILE, GEN2, GEN2, UseChain(GEN2)),
        # The store lost its data, or is behind this machine's copy: publish the copy.
        (FILE, GEN2, None, Publish(GEN2)),
        (FILE, GEN2, GEN1, Publish(GEN2)),
        # A file still holding a token the chain rotated past is history, not news.
        (Tokens("x", "rt-1"), None, GEN2, UseChain(GEN2)),
        # A new login in this machine's file replaces the chain, above the stored generation.
        (NEW_FILE, GEN2, GEN2, Publish(NEW_LOGIN)),
        (NEW_FILE, None, GEN2, Publish(NEW_LOGIN)),
        # A fresh machine whose file has the new login, the store the old chain: the file wins.
        (NEW_FILE, file_chain(NEW_FILE), GEN2, Publish(NEW_LOGIN)),
        # Another machine's old file meets the new login in the store: the store wins.
        (FILE, GEN2, NEW_LOGIN, UseChain(NEW_LOGIN)),
        (FILE, None, NEW_LOGIN, UseChain(NEW_LOGIN)),
        # ...even with a local copy of a higher generation of the replaced chain.
        (
            FILE,
            GEN2.rotated(Tokens("a3", "rt-3")).rotated(Tokens("a4", "rt-4")),
            NEW_LOGIN,
            UseChain(NEW_LOGIN),
        ),
        # This machine has the new login, the store came back with the old chain.
        (NEW_FILE, NEW_LOGIN, GEN2, Publish(NEW_LOGIN)),
        # A refusal on record stays until a file gives a token the chain does not know.
        (
            FILE,
            None,
            GEN2.refusing("refresh_token_reused"),
            UseChain(GEN2.refusing("refresh_token_reused")),
        ),
    ],
)
def test_choose_chain(
    file: Tokens, local: Chain | None, stored: Chain | None, expected: Publish | UseChain
) -> None:
    got = choose_chain(file, local, stored)
    assert type(got) is type(expected)
    assert _plain(got.chain) == _plain(expected.chain)


def test_a_new_login_revives_a_refused_account() -> None:
    refused = GEN2.refusing("invalid_grant")
    got = choose_chain(NEW_FILE, None, refused)
    assert isinstance(got, Publish)
    assert got.chain.refused is None and got.chain.generation == 3


def _plain(chain: Chain) -> tuple[object, ...]:
    return (chain.tokens, chain.generation, chain.origin, set(chain.known), chain.refused)


@pytest.mark.parametrize(
    ("current", "base", "fence", "accepted"),
    [
        (None, None, None, True),  # the first record
        (None, 4, 7, True),  # the store lost its data: any write is news
        ((4, 7), 4, 7, True),  # the lock holder, on the generation it read
        ((4, 7), 4, 9, True),  # a later holder
        ((4, 7), 4, 6, False),  # a holder that stalled past its lease: fenced off
        ((5, 9), 4, 7, False),  # written on an older generation
        ((4, 7), None, None, False),  # "nothing stored" was wrong
        ((4, 7), 4, None, True),  # a publish on the generation it read
        ((5, 7), 4, None, False),
    ],
)
def test_may_write(
    current: tuple[int, int] | None, base: int | None, fence: int | None, accepted: bool
) -> None:
    assert may_write(current, base_generation=base, fence=fence) is accepted


def chain_with(access: str) -> Chain:
    return file_chain(Tokens(access, "rt"))


@pytest.mark.parametrize(
    ("chain", "rejected", "retry_at", "expected"),
    [
        (chain_with(LIVE), None, None, UseToken),
        (chain_with(DUE), None, None, RefreshNow),
        (chain_with(EXPIRED), None, None, RefreshNow),
        (chain_with(""), None, None, RefreshNow),
        (chain_with("opaque"), None, None, UseToken),  # no exp: refreshed on a 401 only
        (chain_with("opaque"), fingerprint("opaque"), None, RefreshNow),
        (chain_with(LIVE), fingerprint("another"), None, UseToken),  # already replaced
        # A backoff runs: a token only inside the margin still serves, nothing else does.
        (chain_with(DUE), None, NOW + 10, UseToken),
        (chain_with(EXPIRED), None, NOW + 10, FailFast),
        (chain_with("opaque"), fingerprint("opaque"), NOW + 10, FailFast),
        (chain_with(EXPIRED), None, NOW - 1, RefreshNow),  # the backoff is over
        (chain_with(LIVE).refusing("invalid_grant"), None, None, FailFast),
    ],
)
def test_refresh_step(
    chain: Chain, rejected: str | None, retry_at: float | None, expected: type
) -> None:
    step = refresh_step(
        chain,
        rejected_tag=rejected,
        wall_now=NOW,
        margin_s=300.0,
        retry_at=retry_at,
        last_failure="http_502",
    )
    assert isinstance(step, expected)


def test_a_refusal_fails_for_good_and_a_backoff_says_when() -> None:
    refused = refresh_step(
        chain_with(LIVE).refusing("invalid_grant"),
        rejected_tag=None,
        wall_now=NOW,
        margin_s=300.0,
        retry_at=None,
    )
    assert refused == FailFast("invalid_grant", permanent=True)
    waiting = refresh_step(
        chain_with(EXPIRED),
        rejected_tag=None,
        wall_now=NOW,
        margin_s=300.0,
        retry_at=NOW + 12,
        last_failure="http_502",
    )
    assert waiting == FailFast("http_502", retry_after_s=12.0)


@pytest.mark.parametrize(
    ("failures", "jitter", "low", "high"),
    [(1, 0.0, 1.0, 1.0), (1, 0.99, 1.9, 2.0), (2, 0.0, 2.0, 2.0), (5, 0.0, 16.0, 16.0)],
)
def test_refresh_backoff_grows(failures: int, jitter: float, low: float, high: float) -> None:
    assert low <= refresh_backoff(failures, jitter=jitter) <= high


def test_refresh_backoff_is_capped() -> None:
    assert refresh_backoff(40, jitter=0.99) <= 300.0


@pytest.mark.parametrize(
    ("generation", "locked", "retry_at", "now", "expected"),
    [
        (5, True, None, NOW, Adopt),  # the holder wrote
        (None, True, None, NOW, Adopt),  # the store lost its data meanwhile
        (4, True, None, NOW, KeepWaiting),
        (4, True, None, NOW + 100, FailFast),  # past the wait's deadline
        (4, False, NOW + 5, NOW, FailFast),  # the holder failed: its backoff
        (4, False, None, NOW, TakeOver),  # the holder gave up or died
        (4, False, NOW - 5, NOW, TakeOver),
    ],
)
def test_wait_step(
    generation: int | None, locked: bool, retry_at: float | None, now: float, expected: type
) -> None:
    step = wait_step(
        seen_generation=4,
        generation=generation,
        lock_held=locked,
        retry_at=retry_at,
        last_failure="http_503",
        wall_now=now,
        deadline=NOW + 30,
    )
    assert isinstance(step, expected)


def test_chain_json_round_trips_and_reads_the_older_format() -> None:
    refused = GEN2.refusing("invalid_grant")
    back = chain_from_json(chain_to_json(refused, wall_now=NOW))
    assert back is not None and _plain(back) == _plain(refused)
    # Version 1: one rotated pair and the origin it descends from.
    old = {"origin": fingerprint("rt-0"), "access_token": "a1", "refresh_token": "rt-1"}
    v1 = chain_from_json(old)
    assert v1 is not None and v1.generation == 1 and v1.knows("rt-0") and v1.knows("rt-1")
    # A version-1 bare refusal is the file's login, refused, while the file still holds it.
    bare = {"origin": fingerprint("rt-0"), "refused": "invalid_grant"}
    assert (got := chain_from_json(bare, FILE)) is not None and got.refused == "invalid_grant"
    assert chain_from_json(bare, NEW_FILE) is None
    assert chain_from_json("garbage") is None
