"""streaming-repro: reproduction of Pinckaers et al., "Detection of prostate cancer in whole-slide
images through end-to-end training with image-level labels" (IEEE TMI 2021)."""

__version__ = "0.1.0"
