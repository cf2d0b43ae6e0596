"""Interlude's benchmark: ``make bench`` (``python -m bench.run``) and ``make explain``."""
