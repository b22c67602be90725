"""The embedded demo: a small CNN trained on scikit-learn digits, with its held-out test split."""
