"""Figures fixed by the paper, which tests compare our sizes against.

TOKENS_PER_SCALE: TokenPacker's scale factor -> visual tokens per 336 px image (CLIP-L/14's
24 x 24 = 576 patches; the paper's 144 / 64 / 36 tokens).
"""

TOKENS_PER_SCALE = {2: 144, 3: 64, 4: 36}
