"""The long-running processes and what they need around them.

``controller`` (the cluster daemon: stats in, balloon targets out), ``agent`` (one per host:
publishes its guests' stats and applies the targets it is sent), ``recorder`` (stats to a
recording), ``metrics`` (Prometheus), ``cluster`` (replica membership), and what all of them
share: ``mqtt`` (the broker link), ``lifecycle`` (fixed-rate loops, stop, signals) and ``logs``
(log formats, counted warnings).
"""
