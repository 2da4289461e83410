"""services: what the service does, one use case to a module, below the API and the
workers that both call them, and above the key store, storage and the message format.

Use cases:
- `seal_to_storage`: seal a stream into a placement, as an object with its record;
- `open_stored`: read a stored object whole and check it against its record;
- `reencrypt`: re-encrypt a stored object under its key's primary version.

What they share:
- `keys`: the key a message is sealed under, and the context pairs that bind it to its
  tenant and its place;
- `objects`: stored objects and their records, and the checks that a stored message is
  the one the service stored there;
- `placement`: where a tenant's objects may live;
- `errors`: the machine codes and client-safe words of every error.

Nothing here reads the settings or knows HTTP: callers pass plain values in.
"""
