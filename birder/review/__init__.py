"""``birder-review``: a person checks a prediction run's answers, the most useful first, and the decisions flow on.

- :mod:`birder.review.folder`: a results folder as units to review (events, photos, photos with boxes);
- :mod:`birder.review.store`: ``reviews.csv``, the decisions, appended durably and shared by tabs and reviewers;
- :mod:`birder.review.plan`: the orders, and the error model behind ``plan``;
- :mod:`birder.review.session`: a review (units + decisions + order), what the page shows;
- :mod:`birder.review.app`: the page and its API (FastAPI, as ``birder-serve``);
- :mod:`birder.review.answers`: the decisions as answers: human observations in exports, labelled photos for
  ``birder-calibrate --val reviews.csv``, crops and splits for ``birder-train``, the figures of ``review-stats``.
"""
