"""workers: the long work — verification, batch encryption of archives, re-encryption, key
lifecycle — as Celery tasks over Redis, or in-process for the embedded default."""
