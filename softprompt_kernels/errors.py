"""The exceptions of the ops: bad arguments name the argument and what was expected."""


class InvalidArgumentError(ValueError):
    """An argument of a softprompt_kernels op has the wrong shape, value or device."""


class InvalidDtypeError(InvalidArgumentError, TypeError):
    """An argument has the wrong type or dtype (both a ValueError and a TypeError)."""


class BackendNotSupportedError(InvalidArgumentError):
    """The requested backend cannot run these inputs; the message lists why."""
