"""Markovian recursive self-aggregation (RSA): engine-independent parameters, seeds, prompts."""
