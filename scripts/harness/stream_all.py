"""mitmproxy script for the benchmark's passthrough path: stream every response body.

What a user who does not run the bridge would run in front of an HTTP SSE
upstream: `mitmdump -s scripts/harness/stream_all.py`, so each SSE chunk is
relayed as it arrives instead of after the whole body.
"""

from mitmproxy import http


class StreamAll:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            flow.response.stream = True


addons = [StreamAll()]
