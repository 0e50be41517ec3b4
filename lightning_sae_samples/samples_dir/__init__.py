"""The samples directory on disk: names, commit protocol, writer and reader."""
