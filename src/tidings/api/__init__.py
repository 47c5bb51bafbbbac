"""The server HTTP API for app backends (and the auth routes clients use)."""
