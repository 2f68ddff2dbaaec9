"""Subject manifests: WebDataset shards of subject clusters plus a Parquet index (see manifests/README.md)."""
