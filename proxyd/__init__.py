"""proxyd: identity-aware reverse proxy for remote MCP servers."""

__version__ = "0.1.0"
