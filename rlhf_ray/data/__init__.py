"""Prompt datasets and their sampling order."""
