"""What the scripts and the tests drive the bridge with from outside; not installed.

mitmdump as a child process (`proxy_process`), a fake OAuth token endpoint
(`oauth_server`), the benchmark (`bench`, `bench_client`, `bench_scaleout`)
with its HTTP SSE upstream (`local_sse_upstream`), delay relay
(`delay_relay`) and passthrough script (`stream_all`). Scripts import it as
`harness` (`scripts/` is their `sys.path[0]`); pytest puts `scripts/` on the
path too (`pythonpath` in pyproject.toml). Test-only fakes are in
`tests/support/`.
"""
