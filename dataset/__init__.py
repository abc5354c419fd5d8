"""DeepDeform-format data: file formats, the dataset reader, augmentation, synthetic data."""
