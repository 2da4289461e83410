"""cli: the `sealstream` command line."""
