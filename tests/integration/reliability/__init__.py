"""Reliability tests (issue 6): fault injection, fuzzing, hostile clients, no leaks."""
