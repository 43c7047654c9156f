"""Tasks beyond image classification (which lives in data/, engine/ and
models/). Each task keeps everything specific to it in its own package
here, so that the classification code never learns about it:

- detection: object detection (issue 23): datasets with boxes, box
  arithmetic, box-moving augmentation; the network and training follow.
"""
