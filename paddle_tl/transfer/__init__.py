"""What to reuse from the pretrained network and how: the transfer plan
(strategies, `auto`), freezing that really freezes, how similar the data is to
ImageNet, cached features of a frozen body, and domain adaptation."""
