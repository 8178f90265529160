"""Presentation only: tables, JSON, live views. Reads state, never changes it."""
