"""Old LogIX's `logix.huggingface`: an alias of `logix.integrations.huggingface` (logix.compat
lists every older name).

Importing it imports transformers; `import logix` alone does not.
"""

from logix.integrations.huggingface import (
    LogIXArguments, LogIXCallback, extract_log, influence_of, patch_trainer,
)

__all__ = ["LogIXCallback", "extract_log", "influence_of", "LogIXArguments", "patch_trainer"]
