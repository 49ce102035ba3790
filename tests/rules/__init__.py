"""Tests of graphprune.rules, one file per op family (the checks live in tests/helpers.py)."""
