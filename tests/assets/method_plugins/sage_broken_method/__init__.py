"""A third-party method that cannot be loaded (its import fails), for the tests."""

raise ImportError("sage_broken_method needs a package that is not installed")
