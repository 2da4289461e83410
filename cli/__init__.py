"""cli: the `sealstream` command line and the Python client of the API."""
