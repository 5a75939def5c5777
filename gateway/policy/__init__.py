"""Conditional Access evaluation: a pure function of request, identity, signals and policies."""
