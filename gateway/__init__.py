"""Portcullis core: configuration, identity, device signals, policy evaluation, pages.

This package never imports mitmproxy; the thin adapters in ``addons/`` do.
"""
