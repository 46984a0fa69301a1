"""Where and when a photo was taken: the location-and-season prior, events, camera-trap exports.

- :mod:`birder.geo.prior`: the prior p(species | place, day) built from occurrence records (H3 cells at several
  resolutions, a circular day-of-year kernel) and how it adjusts a photo's probabilities.
- :mod:`birder.geo.records`: reading occurrence records (CSV or Parquet, Darwin Core column names).
- :mod:`birder.geo.events`: grouping photos of one camera into events by the time between them.
- :mod:`birder.geo.camtrap` and :mod:`birder.geo.coco`: Camtrap DP 1.0.2 and COCO Camera Traps exports.

Needs the ``geo`` extra (``pip install 'birder[geo]'``): h3 and pyarrow are imported only when used.
"""
