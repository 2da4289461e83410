"""workers: the long work — verification, batch encryption of archives, rewrap, key
lifecycle — as Celery tasks over Redis, or in-process for the embedded default."""
