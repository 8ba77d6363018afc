"""Apache Beam pipelines, catalog and storage IO, and the `lookalike` command line."""
