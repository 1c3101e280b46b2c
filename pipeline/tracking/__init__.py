"""One owner of the MLflow record: names (schema.py), writer and reader side by side (record.py), the
front table and plots (plots.py), the review artifacts (review.py)."""
