"""What people and clients see: block pages, 401 answers, and the demo's Starlette apps."""
