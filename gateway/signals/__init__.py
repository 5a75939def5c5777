"""Device and risk signals behind small provider interfaces; they never decide access."""
