"""Errors that are the user's to fix: the CLI prints them as one line, exit 2."""


class UserError(Exception):
    """Bad input: the message names the URL or setting to fix."""


class DataError(UserError):
    """A dataset URL or its contents cannot be used."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""
