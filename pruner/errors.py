"""The package's exception classes: every bad input raises one of these with a message that
names the problem and the fix; :func:`describe` gives any error as the one line a command prints."""


class PrunerError(ValueError):
    """A bad argument, configuration or file. Subclasses ``ValueError`` so callers may catch either."""


class UnsupportedArchitectureError(PrunerError):
    """The model has a structure that group discovery or surgery cannot handle safely."""


class PlanMismatchError(PrunerError):
    """A pruning plan does not fit the model it is applied to."""


def describe(err: BaseException) -> str:
    """One line for any error raised while the fit runs: this package's as they are; an OS error
    with its path; anything else with its type and first line."""
    if isinstance(err, (PrunerError, FileNotFoundError)):
        return str(err)
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or type(err).__name__}: {err.filename}"
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else 'no message'} (--debug shows the traceback)"
