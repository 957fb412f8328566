"""``proxyd dev`` (``make run``): everything embedded — a dev token issuer, a demo MCP app, and
proxyd in front of it. Not production code."""
