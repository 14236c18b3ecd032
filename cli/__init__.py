"""The `tinymoe` command line: one small module per command; the library does the work."""
