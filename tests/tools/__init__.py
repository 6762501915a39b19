"""the tools/*.py scripts as users run them: one file per script, test_<tool>.py."""
