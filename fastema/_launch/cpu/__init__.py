"""The CPU wing of dispatch: the prepared launches (:mod:`.launch`), the pool and its fork rules
(:mod:`.pool`), the thread count (:mod:`.threads`)."""
