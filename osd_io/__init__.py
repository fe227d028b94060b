"""Every byte osd-fleet moves: object stores, checkpoint sources, delta transfer and the catalog.

Below the workers and the flows, above ``osd_core``: ``keys`` (safe object names), ``storage``
(local and S3 stores behind one interface), ``sources`` (checkpoints and files read by range from
either), ``artifacts`` (deltas staged, committed and downloaded) and ``catalog`` (the queryable
record of every delta and its measured accuracy).
"""
