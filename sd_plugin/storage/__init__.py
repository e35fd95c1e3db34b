"""Layer 2, the on-disk format and I/O: what a saved folder holds (``checkpoint``), PEFT adapter
folders, loading folders and Hub ids, the datasets (image folders, Hub datasets, Fashion-MNIST,
digits, the ground-truth localization set) and the EfficientNet-Lite0 conversion."""
