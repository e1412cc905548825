"""The version of cdmoe (recorded in every output's ``cdmoe.json``)."""

__version__ = "0.1.0"
