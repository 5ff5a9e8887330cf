"""Workloads the fixture can time: one QMM, a model prefill, an external engine's results."""
