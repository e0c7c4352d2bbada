"""Transitional: the settings moved to waystation.core.settings (and the message
size limit to waystation.core.limits); kept only while files under concurrent
edit still import it."""

from __future__ import annotations

from waystation.core.limits import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from waystation.core.settings import DEFAULT_ADDRESS as DEFAULT_ADDRESS
from waystation.core.settings import DEFAULT_LISTEN as DEFAULT_LISTEN
from waystation.core.settings import ServerSettings as ServerSettings
from waystation.core.settings import default_data_dir as default_data_dir
from waystation.core.settings import is_loopback as is_loopback
from waystation.core.settings import sqlite_url as sqlite_url
