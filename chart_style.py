"""Chart style: xkcd when its font is installed, matplotlib's plain style otherwise.

Without the font, `plt.xkcd()` would draw wobbly lines with fallback text and
warn on every label, so it is applied only when the font is really there
(`setup_lambda.sh` installs it).
"""

import contextlib

import matplotlib.pyplot as plt
from matplotlib import font_manager

# The family names `plt.xkcd()` asks for that are actual xkcd fonts.
XKCD_FONT_NAMES = ("xkcd", "xkcd Script")


def xkcd_font_installed():
    return any(font.name in XKCD_FONT_NAMES for font in font_manager.fontManager.ttflist)


@contextlib.contextmanager
def chart_style():
    """xkcd style for this block if the font is installed, else the current style unchanged.

    Create and save figures inside the block: matplotlib reads the style when
    it creates artists, not when it draws them.
    """
    if not xkcd_font_installed():
        yield
        return
    with plt.xkcd():
        yield
