"""paddle_tl: transfer learning for image classification on PaddlePaddle."""

__version__ = "0.1.0"
