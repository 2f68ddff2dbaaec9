"""Serving: Ray Serve routes generation requests to the right expert's weights."""
