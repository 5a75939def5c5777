"""Replay: recorded traffic evaluated again under a baseline and a candidate config, and the diff.

``recorded`` reads HAR files and decision logs (``addons.recorded_flows`` reads mitmproxy flow
files), ``engine`` decides each request under both configs, ``report`` and ``html`` show what
flips. No mitmproxy here, no I/O but reading the sources and the device inventory.
"""
