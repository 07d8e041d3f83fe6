"""Former name of :mod:`modules.abn` (activated batch norm): ``from modules.misc import ...`` keeps working.

New code imports from :mod:`modules.abn` or from :mod:`modules`.
"""

from .abn import *  # noqa: F403  (every public name of modules.abn, listed in its __all__)
from .abn import __all__  # noqa: F401
