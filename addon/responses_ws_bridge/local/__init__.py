"""Local stand-ins the bridge can run against on one machine, shipped with it.

`upstream` is the scriptable Responses WebSocket server of `make run ARGS=--live`
and `make demo` (with `response_events`, the events it sends, and `tls`, its
optional certificate); `state_server` is the throwaway Valkey server of
`make run ARGS='--instances 2'`; `loop_thread` runs a server on a thread (the
replay server uses it too). Test-only fakes and the benchmark live outside the
package, in `tests/support/` and `scripts/harness/`.
"""
