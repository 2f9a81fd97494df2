"""autonomic's compiler: checks governor machine files and generates Python tables and diagrams."""

__version__ = "0.1.0"
