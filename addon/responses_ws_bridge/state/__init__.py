"""State shared by the bridge's instances: affinity bindings, response owners, account health
and in-flight leases.

`store.StateStore` is the interface; `memory.MemoryStateStore` is today's
in-process state and `redis_store.RedisStateStore` the shared one. `guarded`
turns a store's failures into `StateUnavailable` answers, `fallback` decides
what a request may do then, and `store_health` paces reconnects.
"""
