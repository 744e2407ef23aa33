"""The package's exception classes: every bad input raises one of these with a message that
names the problem and the fix."""


class PrunerError(ValueError):
    """A bad argument, configuration or file. Subclasses ``ValueError`` so callers may catch either."""


class UnsupportedArchitectureError(PrunerError):
    """The model has a structure that group discovery or surgery cannot handle safely."""


class PlanMismatchError(PrunerError):
    """A pruning plan does not fit the model it is applied to."""
