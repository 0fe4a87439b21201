"""Subcommands of the ``bebop`` CLI (one module each)."""
