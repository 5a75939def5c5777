"""Who is asking: bearer access tokens validated against the issuer's JWKS. Never decides access."""
