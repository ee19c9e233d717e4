"""Tests of the launcher package (all but the simulator)."""
