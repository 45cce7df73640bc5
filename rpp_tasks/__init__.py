__version__ = "0.1.0"

from rpp_tasks._table_io import defer_asdf_table_io as _defer_asdf_table_io  # noqa: E402

_defer_asdf_table_io()
