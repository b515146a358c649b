"""The daemon's side rooms: what a running mount tells the outside, beside the data path.

- metrics.py: every series blobmount exports (exposition.py: the types and the text format);
- control.py: the control socket behind `blobmount status`, and the state it reports;
- http.py: the opt-in ``--metrics`` endpoint (``/metrics``, ``/healthz``, ``/readyz``);
- status.py: `blobmount status MNT`, the client's printing;
- notify.py: systemd's notify protocol (READY, STATUS, WATCHDOG, STOPPING);
- logs.py: log set-up (text, JSON, journald priorities).

None of them reads or serves file data; the data path (fs, reader, fetch, cache, registry) only
counts into metrics.py and logs through the logging module.
"""
