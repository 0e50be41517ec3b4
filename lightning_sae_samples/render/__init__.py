"""Renderers of a samples directory: console, Markdown and HTML, sharing one escaping module."""
