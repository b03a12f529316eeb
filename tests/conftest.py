"""Shared by every test directory: pytest puts this directory on sys.path, so `import required` works anywhere."""
