"""What the tests with images share: the tiny vision preset's vision graph size."""

TINY_VISION_SOFT_TOKENS = 70  # the smallest count Gemma 4's processor takes: 630 patches an image
