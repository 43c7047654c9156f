"""Prediction from an exported inference folder with Paddle Inference or
onnxruntime: the Predictor and `paddle-tl infer`."""
