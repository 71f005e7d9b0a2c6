"""Galatea: self-hosted persona chat for LLaMA-architecture models."""

__version__ = "0.1.0"
