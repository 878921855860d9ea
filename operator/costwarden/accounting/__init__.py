"""Usage accounting, pure: de-duplication, aggregation per team, period and job, rollover.

Nothing here performs I/O. The operator's ingestion (``controllers.ingest``) feeds usage
batches through :mod:`costwarden.accounting.books` and writes the resulting status
fragment with one resourceVersion-guarded patch per team; docs/accounting.md has the design.
"""
