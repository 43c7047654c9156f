"""Networks: the architecture table (which parameters form each stage and the
head, and each architecture's preprocessing), building a network from it,
loading pretrained weights (paddle, torchvision), tapping the head's input
features, and a network in static inference form."""
