"""Typed exceptions raised by the library.

The CLI maps each class to a one-line message plus a hint and an exit code in one
place (``prunecli.cli.errors``). Library code raises these and never prints.
"""

from __future__ import annotations


class PruneCliError(Exception):
    """Base class. ``hint`` is a short suggestion shown after the message."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(PruneCliError):
    """Bad user input: an option out of range, a wrong type, a missing file."""


class SparsityError(InputError):
    """A sparsity that cannot be reached (outside (0, 1), or beyond what the groups allow)."""


class ModelNotFoundError(InputError):
    """A model path, alias or hub id that cannot be resolved."""


class DependencyMissingError(InputError):
    """An optional package needed for this request is not installed."""


class PickleRefusedError(InputError):
    """A pickle checkpoint (.bin/.pt) was refused because --allow-pickle was not given."""


class CheckpointError(InputError):
    """A checkpoint that is corrupt, incomplete or inconsistent with its config."""


class VerifyError(CheckpointError):
    """A checkpoint that, reloaded the way its config says, is not the model that was saved."""

    exit_code = 1


class OutputNotWritableError(InputError):
    """The output folder (or the folder it would be created in) cannot be written."""


class DataError(InputError):
    """Calibration or evaluation data that cannot be read or is too short."""


class OutputExistsError(InputError):
    """The output directory exists and overwrite was not requested."""


class UnsupportedModelError(InputError):
    """The engine cannot prune this architecture correctly; the message says why."""


class PlanError(InputError):
    """A pruning plan that does not fit the model or breaks a group constraint."""


class PrunedModelError(PruneCliError):
    """The engine produced a model whose forward fails (a bug or an unmodelled constraint).

    Raised by ``apply_plan``'s probe forward; the model was modified in place.
    """

    exit_code = 1


class GateError(PruneCliError):
    """A run finished but its report fails a recipe gate (``expect:``); ``failures`` says which.

    Attributes:
        failures: one record per failed gate (see ``prunecli.recipe.check_gates``).
        report: the run's report (the checkpoint, if any, was written).
    """

    exit_code = 3

    def __init__(
        self, message: str, failures: list | None = None, report: dict | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.failures = list(failures or [])
        self.report = report
