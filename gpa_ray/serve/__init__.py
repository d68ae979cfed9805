"""The retriever service: what it computes (`retriever`, no Ray), its HTTP API (`api`:
routes in `routes/`, error answers in `errors`, the work behind them in `backend`), the
in-process server (`local`), and the Ray Serve deployments (`app`)."""
