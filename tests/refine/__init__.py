"""Tests of the refine package."""
