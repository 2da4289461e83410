"""services: what the service does, one use case to a module, below the API and the
workers that both call them, and above the key store, storage and the message format.

Use cases:
- `seal_to_client`: seal a stream and send the message back as it is sealed;
- `seal_to_storage`: seal a stream into a placement, as an object with its record;
- `open_upload`: open an uploaded message and send its plaintext back;
- `open_stored`: open a stored object, whole or a range of it, or read it whole and
  check it against its record (the verify job);
- `reencrypt`: re-encrypt a stored object under its key's primary version.

What they share:
- `keys`: the key a message is sealed or opened under, checked again while a stream
  runs, and the context pairs that bind a message to its tenant and its place;
- `objects`: stored objects and their records, how answers describe them, and the checks
  that a stored message is the one the service stored there;
- `placement`: where a tenant's objects may live;
- `streams`: request chunks batched by the frame, off the event loop when large;
- `errors`: the machine codes and client-safe words of every error;
- `jobs`: the job contract the API and the workers share: kinds, statuses and records of
  jobs, one parameter model per kind, the stores records live in, and the runner
  interface the API hands jobs to.

Nothing here reads the settings or knows HTTP: callers pass plain values in.
"""
