"""Launchers: turn a sweep file into `python -m alignax.train` runs on a backend (see launch/sweep.py)."""
