"""State several gateway processes or hosts share: browser sessions, pending sign-ins, webhook
nonces and (with Redis) the device inventory. One process uses memory; workers on one host share
SQLite files in the state directory; several hosts share Redis. Every shared backend fails closed:
an error is ``SignalUnavailable``, never an answer."""
