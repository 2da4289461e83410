"""api: the HTTP interface — FastAPI app, routes, auth, errors, streaming bodies. It starts
jobs through the job contract (`services.jobs`) and imports nothing of the workers; the
process that serves it is composed in `sealstream.server`."""
