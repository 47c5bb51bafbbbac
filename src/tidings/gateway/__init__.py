"""Thin I/O shells: WebSocket and raw TCP listeners, TLS, the hub of local sessions."""
