"""What counts as the user's error. Each library exception for bad input or settings (a CSV row, a
params key, a mask file, a model folder, a resume under other settings) also derives from UserError,
so the CLI prints its message alone and exits 1 (2 for params.yaml); any other exception is a bug
and keeps its traceback (flows/cli.py). The message must therefore name the file, row or key."""


class UserError(Exception):
    """Bad input, settings or environment: the message is all the user needs to fix it."""


class MissingInput(UserError, FileNotFoundError):
    """A stage's input file is missing: the message names it and the command that writes it."""
