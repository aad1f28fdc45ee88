"""The data path: ImageNet-layout datasets at any fsspec URL, their augmentations,
the global-batch sampler and the Fashion-MNIST preparation."""
