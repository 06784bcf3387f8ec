"""The test suite (a package, so helper modules import as tests.<tier>.<module>)."""
