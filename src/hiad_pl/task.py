"""Tutorial import path for task generators (``from hiad_pl.task import ...``)."""

from hiad_pl.tasks import *  # noqa: F401,F403
from hiad_pl.tasks import __all__  # noqa: F401
