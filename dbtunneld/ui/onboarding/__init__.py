"""First run without writing TOML: `dbtunneld init` (``wizard``), its questions (``prompt``), the
plan it builds (``plan``) and the commented config it writes or merges (``render``)."""
