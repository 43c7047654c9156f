"""Results you can trust on small data: k-fold cross-validation with a
confidence interval (cv.py) and a finder of likely mislabelled training
images (label_issues.py)."""
