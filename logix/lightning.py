"""Old LogIX's `logix.lightning`: an alias of `logix.integrations.lightning` (logix.compat
lists every older name).

Importing it imports lightning; `import logix` alone does not.
"""

from logix.integrations.lightning import (
    LogIXArguments, LogIXCallback, extract_log, influence_of, patch,
)

__all__ = ["LogIXCallback", "extract_log", "influence_of", "LogIXArguments", "patch"]
