"""talkscope: a streaming, real-time audio-visual engine (lip sync, active speaker, identity)."""

__version__ = "0.1.0"
