"""The embedded demo: a broker, a synthetic fleet and the controller in one process, with a
live terminal view (``app``)."""
