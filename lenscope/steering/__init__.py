"""Steering through the patching engine: in-context tasks, h-vectors and function vectors."""
