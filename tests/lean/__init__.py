"""Tests of graphprune.lean, one file per module."""
