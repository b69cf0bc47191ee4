"""Core types: the frame, bounded channels, stages and pipelines, clocks and errors."""
