"""The realtime server: `python -m fastsd.realtime` serves a page at /, a websocket at /ws and /health.

One persistent connection per client; per connection at most one generation in flight and one
pending input, the newest input replacing the pending one (fastsd.realtime.session). Images come
from the engine in process, shared by every client through fastsd.batching, or from a Cog HTTP
server (fastsd.realtime.backend). The protocol: docs/realtime.md.
"""
