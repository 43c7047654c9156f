"""Results you can trust on small data: k-fold cross-validation with a
confidence interval (cv.py), a finder of likely mislabelled training
images (label_issues.py), and where in an image a prediction's evidence
lies (gradcam.py)."""
