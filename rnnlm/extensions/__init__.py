"""Optional accelerations of the core.

Each extension imports the core and is never imported by it (an import-linter contract checks
this); an entry point composes the two. Without an extension the job trains on the core alone.
"""
