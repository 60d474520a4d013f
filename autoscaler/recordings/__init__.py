"""Recordings of guest statistics: the on-disk format (``recording``) and importers of public
traces (``traces``)."""
