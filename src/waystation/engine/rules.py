"""Transitional: the job model moved to waystation.core (states, timeouts).

Kept only while files under concurrent edit still import it; import from
waystation.core.states and waystation.core.timeouts instead.
"""

from __future__ import annotations

from waystation.core.states import ACTIVE as ACTIVE
from waystation.core.states import ERROR as ERROR
from waystation.core.states import FINAL as FINAL
from waystation.core.states import HELD as HELD
from waystation.core.states import OPERATIONS as OPERATIONS
from waystation.core.states import QUEUED as QUEUED
from waystation.core.states import RUNNING as RUNNING
from waystation.core.states import SERIALIZED_OPERATIONS as SERIALIZED_OPERATIONS
from waystation.core.states import SUCCESS as SUCCESS
from waystation.core.states import WAITING as WAITING
from waystation.core.states import State as State
from waystation.core.states import cancelled_status as cancelled_status
from waystation.core.states import serialization_key as serialization_key
from waystation.core.states import state_name as state_name
from waystation.core.timeouts import Timeouts as Timeouts
from waystation.core.timeouts import now_us as now_us
from waystation.core.timeouts import to_us as to_us
