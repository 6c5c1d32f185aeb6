"""The one exception type of the data layer."""


class DataError(ValueError):
    """Bad input data. The message names the file and the row (1-based CSV row as a spreadsheet
    shows it, header = row 1) or the column at fault."""
