"""Images in: datasets (class folders, list files, elpv, unlabeled folders),
decoding any image to RGB, the train/eval transforms, DataLoaders, and the
data check. Everything wrong with the data is found before training."""
