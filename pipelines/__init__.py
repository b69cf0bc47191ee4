"""Assembled pipelines built from ``engine`` stages: offline jobs now, live serving later."""
