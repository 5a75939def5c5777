"""HTTP as the gateway admits it, before any policy: request framing (one reading of where a
request ends), header hygiene and bounds, canonical paths, what streams, and JSON read from the
network. Pure rules; the addons and the web apps apply them."""
