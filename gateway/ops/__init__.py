"""Operating a gateway: reloads and the case gate, readiness, metrics, the drain flag, the admin
audit trail, explaining a logged decision, and What If. None of it decides differently from the
gateway: every decision here goes through ``gateway.decision.pipeline``."""
