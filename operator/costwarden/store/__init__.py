"""The usage store: every acknowledged usage record as a row of a Parquet file.

``schema`` (the columns and the file layout), ``writer`` (exactly-once writes from the
operator's ingestion), ``query`` (DuckDB over the files: ``costwarden report``),
``focus`` (the FOCUS export) and ``reconcile`` (provider usage and cost exports against
the store). pyarrow and duckdb are the optional extra ``costwarden[store]``: nothing here
is imported by the operator unless ``--store-dir`` is set. See docs/store.md.
"""
