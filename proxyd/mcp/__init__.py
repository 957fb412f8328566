"""MCP-aware parts of proxyd: protocol eras, session ids, (later) policy and audit."""
