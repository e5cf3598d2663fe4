"""Evaluation utilities (programmatic scene detectors and scores)."""
