"""Click entry points: parse flags, build a config, call one library function."""
