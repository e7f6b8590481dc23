"""Models: gated backbones, Forward-OFA controller/extractor/mapper, sub-model assembly, costs."""
