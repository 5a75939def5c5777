"""Thin mitmproxy addons: turn a flow into an access request for the core and apply its outcome.

No policy logic lives here; ``gateway`` never imports this package.
"""
