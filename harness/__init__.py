"""Certification harness: prove a new model behaves identically in every backend it claims."""
__version__ = "0.1.0"
