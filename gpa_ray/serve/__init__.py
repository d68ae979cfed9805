"""The retriever service: what it computes (`retriever`, no Ray), its HTTP API (`api`),
the in-process server (`local`), and the Ray Serve deployments (`app`)."""
