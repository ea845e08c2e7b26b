"""Catalogue audit (``align audit``, align/audit/command.py): per item, how well its photo, texts and
sound agree, and flags for mismatched, duplicate, outlying and missing or unreadable listings."""
