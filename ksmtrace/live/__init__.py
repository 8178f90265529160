"""live: the periodic look at the host that the dashboards share.

``sampler`` loads the probes once and turns each interval into one
:class:`~ksmtrace.model.snapshot.Snapshot` (faults, merges, ksmd, who opted
in and how); ``board`` keeps the latest snapshot, a bounded history of it
and the coordinator's decisions, for ``top``, the Prometheus metrics and the
web page; ``server`` serves them over HTTP (read-only). Nothing here changes
the machine.
"""
