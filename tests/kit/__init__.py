"""Shared test helpers; test modules import these (and tests.conftest), never each other.

echo (Echo, Upstreams), proxy (config, bearer, rpc_error, access_lines, ...), wait (GUARD,
until), net (free_port), tomltext, limits, sessions (the sealed-session rig), daemon (a real
`proxyd run`), issuer (the test IdP), mcpkit (official SDK client and server), nodekit (the
Node side), redisserver, recording, harness, bodies.
"""
