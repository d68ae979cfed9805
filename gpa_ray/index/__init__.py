"""Retrieval indexes: the on-disk format (`store`), the Ray Data build (`build`) and the
two-stage search (`search`: inner-product shortlist, full GPA rerank, text bias)."""
