"""Bundled examples that work offline (scikit-learn's digits, a tiny transformer)."""
