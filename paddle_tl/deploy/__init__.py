"""Deployment: a finished run exported as a static Paddle Inference model
(and ONNX) with its exact preprocessing, checked for parity before anyone
deploys it."""
