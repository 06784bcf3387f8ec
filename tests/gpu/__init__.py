"""Tests that need a CUDA GPU (marker gpu; skipped without one)."""
