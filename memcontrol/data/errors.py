"""The one exception type of the data layer."""

from memcontrol.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. The message names the file and the row (1-based CSV row as a spreadsheet
    shows it, header = row 1) or the column at fault."""
