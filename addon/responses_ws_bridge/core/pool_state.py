"""What the bridge remembers about its accounts: the pool, affinity bindings, response owners.

One object, so that the addon that loads the accounts file, the service that
routes requests and the recorder that redacts secrets all see the same
accounts. In memory and pure: time comes from the injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from responses_ws_bridge.core.account_pool import AccountPool
from responses_ws_bridge.core.accounts import AccountsConfig, secrets_of
from responses_ws_bridge.core.affinity import Affinity, AffinityKind, owner_for
from responses_ws_bridge.core.bindings import Binding, MemoryBindingStore, bindings_for
from responses_ws_bridge.core.redaction import SecretScrubber

DEFAULT_BINDING_MAX = 100_000
DEFAULT_BINDING_TTL_S = 24 * 3600.0


class PoolState:
    def __init__(
        self,
        *,
        binding_max: int = DEFAULT_BINDING_MAX,
        binding_ttl_s: float = DEFAULT_BINDING_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        # The pool's clock, for whoever converts its times (e.g. to a shared store's wall clock).
        self.clock = clock
        self.pool: AccountPool | None = None
        self.config: AccountsConfig | None = None
        self.binding_max = binding_max
        self.binding_ttl_s = binding_ttl_s
        self.bindings = MemoryBindingStore(binding_max, binding_ttl_s, clock)
        self.response_owners = MemoryBindingStore(binding_max, binding_ttl_s, clock)
        # Secrets that live outside the accounts file (rotated access and refresh tokens).
        self.live_secrets: Callable[[], Iterable[str]] = tuple
        self._scrubber: tuple[tuple[str, ...], SecretScrubber] = ((), SecretScrubber())

    @property
    def pooled(self) -> bool:
        """False: pass-through mode, the client's own credential goes upstream."""
        return self.pool is not None

    def set_binding_limits(self, binding_max: int, binding_ttl_s: float) -> None:
        """New bounds start new, empty stores (the old entries were kept under the old ones)."""
        if (binding_max, binding_ttl_s) == (self.binding_max, self.binding_ttl_s):
            return
        self.binding_max, self.binding_ttl_s = binding_max, binding_ttl_s
        self.bindings = MemoryBindingStore(binding_max, binding_ttl_s, self._clock)
        self.response_owners = MemoryBindingStore(binding_max, binding_ttl_s, self._clock)

    def set_accounts(self, config: AccountsConfig | None) -> list[str]:
        """A new accounts file (None: pass-through mode); returns the removed account ids."""
        if config is None:
            removed = self.pool.ids if self.pool is not None else []
            self.pool = None
        elif self.pool is None:
            self.pool = AccountPool(config, clock=self._clock)
            removed = []
        else:
            removed = self.pool.reload(config)
        self.config = config
        for account_id in removed:
            self.bindings.remove_account(account_id)
            self.response_owners.remove_account(account_id)
        return removed

    def secrets(self) -> list[str]:
        """Every account and client secret, for redaction."""
        found = secrets_of(self.config) if self.config is not None else []
        return [*found, *self.live_secrets()]

    def scrubber(self) -> SecretScrubber:
        """One scrubber of every known secret, rebuilt only when the secrets changed."""
        secrets = tuple(self.secrets())
        known, scrubber = self._scrubber
        if secrets != known:
            scrubber = SecretScrubber(secrets)
            self._scrubber = (secrets, scrubber)
        return scrubber

    def owner(self, affinity: Affinity) -> str | None:
        """The account `affinity` is tied to (pool mode), or None."""
        if self.pool is None:
            return None

        def bound(key: str) -> str | None:
            binding = self.bindings.get(key)
            return binding.account_id if binding is not None else None

        def produced(response_id: str) -> str | None:
            binding = self.response_owners.get(response_id)
            return binding.account_id if binding is not None else None

        return owner_for(affinity, bound_account=bound, response_owner=produced)

    def bind(self, affinity: Affinity, account_id: str) -> None:
        if affinity.kind is AffinityKind.NONE:
            return
        for key, binding in bindings_for(affinity, account_id):
            self.bindings.set(key, binding)

    def bound_sessions(self) -> dict[str, int]:
        """Sessions bound to each account in this process's memory."""
        return self.bindings.bound_sessions()

    def served(self, affinity: Affinity, account_id: str, response_id: str | None) -> None:
        """A turn reached its client from `account_id`: its keys and its response belong there.

        `response_id` only for a response that completed and was delivered: a
        failed or cut-off one is nothing a later `previous_response_id` can
        continue from.
        """
        if self.pool is None or self.pool.account(account_id) is None:
            # Removed from the accounts file while the turn ran: bind nothing to it.
            return
        self.pool.record_success(account_id)
        self.bind(affinity, account_id)
        if response_id is not None:
            self.response_owners.set(response_id, Binding(account_id))
