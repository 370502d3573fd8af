"""seqio Task and Mixture registrations (import a module to register).

* ``tasks.synthetic`` -- embedded default: artificial-language translation.
* ``tasks.multi30k``  -- Multi30k from a user-named data dir.
* ``tasks.c4``, ``tasks.mc4``, ``tasks.wmt`` -- TFDS-backed (read only when used).

``import tasks`` registers all of them; registering never reads data.
"""

from tasks import c4  # noqa: F401
from tasks import mc4  # noqa: F401
from tasks import multi30k  # noqa: F401
from tasks import synthetic  # noqa: F401
from tasks import wmt  # noqa: F401
