"""Clients of the talkscope event server (the Python client and ``watch`` arrive with serving)."""
