"""The store's verbs, one mixin class per group of aggregates; `Store` is all of them.

Each verb is one transaction: a plain function of a connection in the
aggregate's module (`store/jobs.py`, `store/templates.py`, ...), run whole by
the store's private `Database`. A verb is a plain method returning the
database call's coroutine, not a coroutine of its own: on the hot path that is
one frame more than calling the database directly, and no allocation.
"""
