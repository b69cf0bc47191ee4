"""Faces: detection, landmark tracking and per-track crops."""
