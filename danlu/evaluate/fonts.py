"""Fonts for plots: find a CJK font so that Chinese label names render, and degrade cleanly without one.

matplotlib's default DejaVu Sans has no Chinese glyphs: a label like 负面 comes out as empty boxes
and one warning per missing glyph. `plot_style()` sets `font.family` to [DejaVu Sans, <the first CJK
font found>]: matplotlib falls back glyph by glyph along that list (only along `font.family` itself,
not along a generic family's list), so Latin text keeps DejaVu Sans and Chinese gets the CJK font.
Without one, `display_labels` replaces labels that cannot be drawn by their class numbers, and one
warning says which package to install (Debian / Ubuntu: `apt-get install fonts-wqy-microhei`).

>>> with plot_style():                                     # doctest: +SKIP
...     fig = new_figure(6, 4)
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

# Families that carry simplified Chinese, most preferred first.
CJK_FAMILIES = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "Source Han Sans CN", "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei", "Noto Sans CJK JP", "Noto Sans CJK TC", "Droid Sans Fallback", "Microsoft YaHei",
    "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS", "AR PL UMing CN",
)
# File-name fragments of the same fonts, for fonts installed after matplotlib cached its font list.
CJK_FILES = ("notosanscjk", "notoserifcjk", "notosanssc", "sourcehansans", "wqy-microhei", "wqy-zenhei",
             "droidsansfallback", "msyh", "simhei", "pingfang", "hiragino", "uming", "ukai")
INSTALL_HINT = ("install a CJK font, e.g. `apt-get install fonts-wqy-microhei` or `fonts-noto-cjk` (Debian / Ubuntu), "
                "`dnf install google-noto-sans-cjk-fonts` (Fedora), then rerun")
BASE_FAMILY = "DejaVu Sans"


@functools.lru_cache(maxsize=1)
def cjk_font():
    """The family name of an installed CJK font, or None."""
    from matplotlib import font_manager

    def known():
        names = {f.name for f in font_manager.fontManager.ttflist}
        return next((family for family in CJK_FAMILIES if family in names), None)

    family = known()
    if family:
        return family
    # matplotlib caches the font list once; a font installed since is found on disk and added here
    for path in font_manager.findSystemFonts():
        if any(fragment in os.path.basename(path).lower() for fragment in CJK_FILES):
            with contextlib.suppress(Exception):  # an unreadable font file is simply not used
                font_manager.fontManager.addfont(path)
    return known()


def families():
    """The font list for plots: DejaVu Sans, then the CJK font that matplotlib falls back to glyph by glyph."""
    family = cjk_font()
    return [BASE_FAMILY, family] if family else [BASE_FAMILY]


@contextlib.contextmanager
def plot_style():
    """rcParams for every danlu plot; silences matplotlib's per-glyph warnings (we warn once instead)."""
    import matplotlib

    style = {"font.family": families(), "axes.unicode_minus": False,
             "figure.dpi": 100, "savefig.dpi": 120, "axes.grid": True, "grid.alpha": 0.3}
    with matplotlib.rc_context(style), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from")
        yield


def can_render(text):
    """True when the plot fonts have a glyph for every character of `text`."""
    from matplotlib.font_manager import FontProperties, findfont, get_font

    fonts = [get_font(findfont(FontProperties(family=f), fallback_to_default=False)) for f in _available(families())]
    return all(ch.isspace() or any(font.get_char_index(ord(ch)) for font in fonts) for ch in str(text))


def display_labels(labels):
    """Labels as plots show them: unchanged when they can be drawn, else "class <i>" (warning once)."""
    labels = [str(x) for x in labels]
    if all(can_render(x) for x in labels):
        return labels
    warn_missing_font(labels)
    return [x if can_render(x) else f"class {i}" for i, x in enumerate(labels)]


_warned = []  # one warning per process: appended to once


def warn_missing_font(labels=()):
    if _warned:
        return
    _warned.append(True)
    sample = ", ".join(str(x) for x in list(labels)[:3])
    warnings.warn(f"no font on this machine can draw some label names ({sample}); plots show class numbers "
                  f"instead, the report lists the names. To draw them: {INSTALL_HINT}", stacklevel=3)


def _available(names):
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    return [n for n in names if n in installed] or [BASE_FAMILY]


def new_figure(width, height):
    """A figure on the Agg canvas, outside pyplot: no global state, no GUI backend, safe in threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig
