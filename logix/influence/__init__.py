"""Influence: preconditioners, scoring modes and streaming over saved logs."""
